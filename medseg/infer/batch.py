"""`medseg predict`: many scans through one model, each written completely or not at all.

For each scan: `<case>_seg.nii.gz` on the scan's exact grid, `<case>_volumes.json`, overlay PNGs (three
montages and a thumbnail), a 3D Slicer `.seg.nrrd` and ITK-SNAP labels; for a task with `instances`,
`<case>_instances.nii.gz` and `.csv` (one id per object, `medseg.infer.instances`); optionally probability
maps and, with a reference, metrics. Then `summary.json` and `review.html` for all cases.
A bad scan is reported and skipped; the others still run; the exit code says whether any failed.
Under torchrun the scans are shared among the processes (scan i to rank i % size), so each is written
once, and rank 0 writes the summary and review page of all of them at the end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.dicom.export import DicomOutputs, check_dicom_inputs, write_dicom_outputs
from medseg.dicom.series import series_files
from medseg.distributed import World
from medseg.errors import InputError
from medseg.infer.calibration import read_calibration
from medseg.infer.ensemble import make_predictor, model_folders, postprocessing_of
from medseg.infer.predictor import Predictor, Segmentation
from medseg.infer.qa import Checker
from medseg.runtime import resolve_device
from medseg.planar import is_planar, png_holds
from medseg.io import (case_name, from_array, is_image_path, read_image, read_label, write_image, write_sitk,
                       write_text)

__all__ = ["Predictor", "PredictOptions", "predict_many", "find_model", "expand_inputs"]


@dataclass(frozen=True)
class PredictOptions:
    model: Path | None = None  # run folder; None: newest under runs/<task>/
    task: str = "prostate"
    device: str = "auto"
    fast: bool = False
    tta: bool | None = None  # None: the task's inference.tta
    probabilities: bool = False
    overlays: bool = True
    runs: Path = Path("runs")
    precision: str = "auto"  # auto, bf16 or fp32 (medseg.runtime.resolve_precision)
    backend: str = "auto"  # auto, torch or openvino (medseg.infer.backends.resolve_backend)
    series: str | None = None  # series UID to read from DICOM folders holding several
    uncertainty: bool = False  # per-voxel uncertainty maps and per-organ confidence (medseg.infer.uncertainty)
    dicom_seg: bool = False  # DICOM series inputs: also <case>_seg.dcm, a DICOM-SEG (medseg.dicom.export)
    rtstruct: bool = False  # DICOM series inputs: also <case>_rtstruct.dcm, an RTSTRUCT


def find_model(task: str, runs: Path = Path("runs")) -> Path:
    """The newest model for `task` under runs/<task>/: a run folder that holds a best.pt, or a cross-validation
    folder (`--fold all`) whose every fold holds one, by the time of its newest best.pt."""
    from medseg.infer.ensemble import trained_folds

    name = Path(task).stem
    candidates = [(p.stat().st_mtime, p.parent) for p in Path(runs, name).glob("*/best.pt")]
    for folder in Path(runs, name).glob("*/"):
        folds = trained_folds(folder)
        if folds:
            candidates.append((max((f / "best.pt").stat().st_mtime for f in folds), folder))
    if not candidates:
        raise InputError(f"no trained model for task '{name}' under {Path(runs, name)}/; train one with "
                         f"`medseg train --task {name}` or pass --model RUN_FOLDER")
    return max(candidates)[1]


def found_model_line(model: Path, task: str) -> str:
    """What `find_model` took, for the terminal: the folder, and whether it is one model or an ensemble."""
    folds = model_folders(model)
    kind = "a run folder" if folds == [model] else f"a cross-validation folder: the ensemble of its {len(folds)} folds"
    return f"model: {model} (the newest for task '{Path(task).stem}'; {kind})"


def expand_inputs(inputs: Sequence[Path]) -> list[Path]:
    """Files stay; a folder of image files becomes its images; any other folder is a DICOM series."""
    scans = []
    for path in map(Path, inputs):
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.is_file() and is_image_path(p))
            scans.extend(images or [path])
        else:
            scans.append(path)  # missing files are reported per case, with the others still running
    return scans


def check_dicom_folders(scans: Sequence[Path], series: str | None) -> None:
    """Refuse, before the model loads, a DICOM folder whose series is ambiguous or whose slices are not a
    regular stack (`medseg.dicom.series`): headers only, so it costs milliseconds, and nothing is written."""
    from medseg.dicom.series import series_files

    for scan in scans:
        if scan.is_dir():
            series_files(scan, series)


def match_references(references: Sequence[Path]) -> dict[str, Path]:
    """Reference label maps by case name (folders are expanded)."""
    found = {}
    for path in expand_inputs(references):
        found[case_name(path)] = path
    return found


def _write_masks(seg: Segmentation, task, out: Path, case: str) -> float:
    """The mask, probability maps and viewer files; returns the seconds it took."""
    from medseg.review.viewers import write_viewer_files

    start = time.perf_counter()
    mask = from_array(seg.labels, seg.grid)  # one SimpleITK copy of the mask, for the NIfTI and the NRRD
    write_sitk(mask, out / f"{case}_seg.nii.gz")
    if png_holds(seg.grid):  # a 2D image that a PNG places exactly (every PNG/TIFF input): for image viewers
        write_sitk(mask, out / f"{case}_seg.png")
    if seg.probabilities is not None:
        for label_id, organ in seg.organs.items():
            write_image(seg.probabilities[label_id], seg.grid, out / f"{case}_prob_{organ}.nii.gz")
    write_viewer_files(seg.labels, seg.grid, task.labels, out, case, image=mask)
    if seg.uncertainty is not None:
        from medseg.infer.uncertainty import write_maps

        write_maps(seg.uncertainty, seg.disagreement, seg.grid, out, case)
    return time.perf_counter() - start


def write_outputs(seg: Segmentation, image, case: str, out: Path, task, options: PredictOptions,
                  reference: Path | None) -> dict:
    """Everything for one case; returns the case's row for the summary and review page.

    A second thread writes the mask files while this one draws the overlays: SimpleITK and zlib let
    go of the GIL, so on a 2-core machine the writing costs no wall time ("write" in the timings then
    overlaps "overlays").
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-write") as writer:
        masks = writer.submit(_write_masks, seg, task, out, case)
        organs = seg.volumes()
        row = _evaluate_and_draw(seg, organs, image, case, out, task, options, reference)
        if task.instances:  # <case>_instances.nii.gz and .csv: touching objects split (medseg.infer.instances)
            from medseg.infer.instances import write_instances

            start = time.perf_counter()
            row["instances"] = write_instances(seg.labels, seg.grid, task, out, case)
            row["seconds"]["instances"] = round(time.perf_counter() - start, 3)
        row["seconds"]["write"] = round(masks.result(), 3)
    row["flags"] = seg.flags  # medseg.infer.qa, worst first
    if seg.confidence:
        row["confidence"] = {organ: values.get("confidence") for organ, values in organs.items()}
        estimates = {organ: values["estimated_dice"] for organ, values in organs.items() if "estimated_dice" in values}
        if estimates:
            row["estimated_dice"] = estimates
    volumes = {"case": case, "organs": organs, "flags": seg.flags, "seconds": row["seconds"]}
    write_text(json.dumps(volumes, indent=2), out / f"{case}_volumes.json")
    return row


def _evaluate_and_draw(seg: Segmentation, organs: dict, image, case: str, out: Path, task, options: PredictOptions,
                       reference: Path | None) -> dict:
    seconds = dict(seg.seconds)
    row = {"case": case, "volumes_ml": {k: v["volume_ml"] for k, v in organs.items()}, "overlays": []}
    if is_planar(seg.grid.shape):  # a 2D image: areas, which the summary line and the review page show
        row["areas_mm2"] = {k: v["area_mm2"] for k, v in organs.items()}
    ref_labels = None
    if reference is not None:
        from medseg.evaluate.run import report_case

        ref_labels, ref_grid = read_label(reference, task.dimensions)
        if not ref_grid.matches(seg.grid):
            raise InputError(f"reference {reference} is not on the grid of the scan ({seg.grid.describe()})")
        # <case>_metrics/: metrics, the task's surface Dice tolerances, slices.csv and the profile plot
        rows, summary, files = report_case(ref_labels, seg.labels, seg.grid, seg.organs, task, out / f"{case}_metrics",
                                           case)
        row["dice"] = {r["organ"]: r["value"] for r in rows if r["metric"] == "dice"}
        row["slice_files"] = [p.relative_to(out).as_posix() for p in files]
        row["worst_slices"] = {organ: s["worst_slices"][case]["lowest_dice"][0] for organ, s in summary.items()
                               if s.get("worst_slices", {}).get(case, {}).get("lowest_dice")}
    if options.overlays:
        from medseg.review.overlays import write_overlays

        start = time.perf_counter()
        if ref_labels is not None:
            ref = (ref_labels, seg.grid)
            paths = write_overlays(image, (seg.labels, seg.grid), task, out, reference=ref, case=case)
        else:
            paths = write_overlays(*around_organs(seg, image), task, out, case=case)
        if seg.uncertainty is not None:  # the review page's uncertainty layer
            from medseg.review.heatmap import write_uncertainty_picture

            paths.append(write_uncertainty_picture(image, seg, task, out, case))
        row["overlays"] = [p.name for p in paths]
        seconds["overlays"] = time.perf_counter() - start
    row["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return row


def around_organs(seg: Segmentation, image: tuple) -> tuple[tuple, tuple]:
    """The scan and the mask cut to the organs plus the overlays' margin, as (array, Grid) pairs.

    The overlays show that box only, so they come out the same, but choosing and drawing slices then
    never passes over a whole 512 x 512 CT.
    """
    from medseg.geometry import grow_mm
    from medseg.review.views import MARGIN_MM

    if seg.extent is None or is_planar(seg.grid.shape):  # a 2D image's overlay shows all of it
        return image, (seg.labels, seg.grid)
    box = grow_mm(seg.extent, seg.grid.spacing, seg.grid.shape, MARGIN_MM)
    grid = seg.grid.crop(box)
    # a copy in the mask's own memory order: find_objects on a strided view is ~2x slower
    return (image[0][(slice(None), *box)], grid), (np.asfortranarray(seg.labels[box]), grid)


def _print_case(row: dict, log) -> None:
    """A case's volumes (and confidence) and timings on one line, then its QA flags, on stderr."""
    import sys

    from medseg.infer.qa import format_flags
    from medseg.units import readable

    timing = ", ".join(f"{k} {v:.2f} s" for k, v in row["seconds"].items())
    confidence, estimates = row.get("confidence") or {}, row.get("estimated_dice") or {}
    sizes, unit = (row["areas_mm2"], "mm²") if "areas_mm2" in row else (row["volumes_ml"], "mL")

    def scores(organ: str) -> str:
        said = ([f"confidence {confidence[organ]:.2f}"] if confidence.get(organ) else []) + \
               ([f"estimated Dice {estimates[organ]:.2f}"] if organ in estimates else [])
        return f" ({', '.join(said)})" if said else ""

    volumes = ", ".join(f"{k} {readable(v, unit)}{scores(k)}" for k, v in sizes.items())
    print(f"{row['case']}: {volumes} ({timing})", file=sys.stderr)
    if row.get("instances"):
        print(f"{row['case']}: " + ", ".join(f"{n} {k} instances" for k, n in row["instances"].items()), file=sys.stderr)
    for line in format_flags(row["case"], row.get("flags", [])):
        print(line, file=sys.stderr)
    log.info("%s: %s", row["case"], timing)


def _write_summary(out: Path, model: Path, predictor, rows: list[dict], failures: list, check) -> None:
    """summary.json (post-processing and its source, whether flips were averaged, cases, failures, QA flags worst
    first) and review.html."""
    import sys

    from medseg.review.page import write_review_page

    flips = predictor.tta if isinstance(predictor, Predictor) else predictor.members[0].tta  # the task's, or --tta
    write_text(json.dumps({"model": str(model), "postprocessing": postprocessing_of(predictor),
                           "test_time_flips": bool(flips), "cases": rows,
                           "failed": [{"input": str(p), "error": m} for p, m in failures], **check.report(rows)},
                          indent=2), out / "summary.json")
    print(check.closing_line(rows), file=sys.stderr)
    write_review_page(out, rows)


def _in_scan_order(shares: list[list[tuple]]) -> list[tuple]:
    """The items of every rank in the order of the scans (each item starts with its scan's index)."""
    return sorted((item for share in shares for item in share), key=lambda item: item[0])


def _predict_one(scan: Path, predictor, check: Checker, out: Path, options: PredictOptions, refs: dict,
                 dicom: DicomOutputs, model: Path) -> dict:
    """Read, segment, flag and write one scan (and its DICOM outputs); returns its summary row."""
    import sys

    case, task = case_name(scan), predictor.task
    start = time.perf_counter()
    series = options.series if scan.is_dir() else None
    image = read_image(scan, dtype=None, series_uid=series, dimensions=task.dimensions)  # the file's type: CT int16
    read_seconds = time.perf_counter() - start
    seg = predictor.predict(image, keep_probabilities=options.probabilities)
    seg.seconds["read"] = read_seconds
    seg.flags = check(seg)
    row = write_outputs(seg, image, case, out, task, options, refs.get(case))
    if dicom.wanted:
        files = series_files(scan, options.series)
        row["dicom"] = [p.name for p in write_dicom_outputs(seg.labels, seg.grid, files, task, model, out, case, dicom)]
        print(f"{case}: wrote {', '.join(row['dicom'])}" if row["dicom"] else
              f"{case}: no organ segmented, so no DICOM-SEG/RTSTRUCT written", file=sys.stderr)
    return row


def predict_many(inputs: Sequence[Path], out: Path, options: PredictOptions,
                 references: Sequence[Path] = (), world: World | None = None) -> list[tuple[Path, str]]:
    """Segment every input; returns the (input, message) of each that failed.

    Args:
        world: the processes sharing the scans, from `medseg.distributed.joined` (its device replaces
            `options.device`); None: this process alone. Every rank returns the failures of all ranks.
    """
    import logging
    import sys

    from tqdm import tqdm

    from medseg.infer.backends import describe_backend
    from medseg.infer.int8 import quantize_hint

    log = logging.getLogger("medseg.predict")
    world = world or World(resolve_device(options.device))
    scans = expand_inputs(inputs)
    check_dicom_folders(scans, options.series)
    dicom = DicomOutputs(seg=options.dicom_seg, rtstruct=options.rtstruct)
    check_dicom_inputs(scans, dicom)  # NIfTI inputs cannot have DICOM outputs: refused before any work
    model = Path(options.model) if options.model else find_model(options.task, options.runs)
    if not options.model and world.is_main:
        print(found_model_line(model, options.task), file=sys.stderr)
    predictor = make_predictor(model, str(world.device), options.fast, options.tta, options.precision,
                               options.uncertainty, options.backend)  # a cross-validation folder: its folds' ensemble
    if world.is_main:
        print(f"{model.name}: {describe_backend(predictor)}", file=sys.stderr)
        if hint := quantize_hint(predictor, options.precision):
            print(hint, file=sys.stderr)
    task = predictor.task
    check = Checker(model_folders(model), task, postprocessing_of(predictor)["largest_component"],
                    with_confidence=not isinstance(predictor, Predictor), calibration=read_calibration(model))
    refs = match_references(references)
    out = Path(out)
    rows, failures = [], []  # (scan index, row) and (scan index, input, message)
    mine = world.shard(list(enumerate(scans)))
    for index, scan in tqdm(mine, desc="predict", unit="scan",
                            disable=not sys.stderr.isatty() or len(mine) < 2 or not world.is_main):
        try:
            row = _predict_one(scan, predictor, check, out, options, refs, dicom, model)
        except InputError as error:
            message = str(error).splitlines()[0]
            failures.append((index, scan, message))
            print(f"error: {message}", file=sys.stderr)
            continue
        rows.append((index, row))
        _print_case(row, log)
    rows = [row for _, row in _in_scan_order(world.gather(rows))]
    failures = [(scan, message) for _, scan, message in _in_scan_order(world.gather(failures))]
    if not world.is_main:
        return failures
    if rows:
        _write_summary(out, model, predictor, rows, failures, check)
    print(f"{len(rows)} of {len(scans)} scans segmented into {out}" + (f"; {len(failures)} failed" if failures else ""),
          file=sys.stderr)
    return failures
