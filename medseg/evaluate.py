"""Evaluate predicted masks against references: a report built as rows, then written.

`evaluate_case` turns one (reference, prediction) pair of label maps into rows
`{"case", "organ", "metric", "value"}`; `evaluate_pairs` does it for files, checking that both lie on
the same grid; `medseg.report.write_report` writes the rows (metrics.csv, long form), their summary
(summary.json, keyed by organ name) and a Dice box plot; `run_evaluation` is `medseg evaluate`.

References are a mask file, a folder of masks, or a dataset folder (`medseg.datasets` layouts). With
a dataset, an organ a case did not contour (its `contoured` list, partial labels) is skipped for that
case: no rows, not counted in any mean.

Per organ: dice, iou, precision, recall, specificity, volume_ref_ml, volume_pred_ml,
relative_volume_difference, hd95_mm, hd_mm, assd_mm, surface_dice. Per case (organ "all"):
pixel_accuracy and mean_pixel_accuracy. Definitions and the empty-mask conventions are in
`medseg.metrics`: an organ absent from both masks is "empty" (NaN Dice), left out of every mean and
counted as `n_empty`; an organ absent from one mask scores Dice 0 and distance `inf`, and the
summary leaves `inf` out of mean/std/median and counts it as `n_inf`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Union

import numpy as np
from scipy import ndimage

from medseg import metrics
from medseg.errors import InputError
from medseg.io import IMAGE_SUFFIXES, Grid, case_name, is_image_path, read_label
from medseg.report import CASE_ORGAN, Row, write_report

DEFAULT_TOLERANCE_MM = 2.0  # surface Dice tolerance when none is given for an organ
ORGAN_METRICS = ("dice", "iou", "precision", "recall", "specificity", "volume_ref_ml", "volume_pred_ml",
                 "relative_volume_difference", "hd95_mm", "hd_mm", "assd_mm", "surface_dice")
CASE_METRICS = ("pixel_accuracy", "mean_pixel_accuracy")
PRED_SUFFIX = "_seg"  # `medseg predict` writes <case>_seg.nii.gz

Pair = tuple[str, Path, Path]  # (case, prediction file, reference file)
Tolerance = Union[float, Mapping[str, float]]  # mm, one for all organs or organ name -> mm


# ------------------------------------------------------------------------------------------ rows


def _tolerance(tolerance_mm: Tolerance, organ: str) -> float:
    if isinstance(tolerance_mm, Mapping):
        return float(tolerance_mm.get(organ, DEFAULT_TOLERANCE_MM))
    return float(tolerance_mm)


def _organ_rows(case: str, organ: str, values: Mapping[str, float]) -> list[Row]:
    return [{"case": case, "organ": organ, "metric": m, "value": float(values[m])} for m in ORGAN_METRICS]


def _empty_organ_rows(case: str, organ: str) -> list[Row]:
    """Rows of an organ absent from both masks (they do not depend on the volume)."""
    none = np.zeros(0)
    values = {**metrics.overlap_metrics(0, 0, 0, 1, 1.0),
              **metrics.distance_metrics(none, none, DEFAULT_TOLERANCE_MM)}
    return _organ_rows(case, organ, values)


def evaluate_case(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float],
                  organs: Mapping[int, str] | None, tolerance_mm: Tolerance = DEFAULT_TOLERANCE_MM,
                  not_contoured: Iterable[str] = (), case: str = "case") -> list[Row]:
    """Every metric of one case as rows `{"case", "organ", "metric", "value"}`.

    Args:
        ref: reference label map (X, Y, Z), integer values (0 background).
        pred: predicted label map on the same grid.
        spacing: voxel size in mm along X, Y, Z.
        organs: label value -> organ name. Values in the masks but not here count as background.
            None names every value present `label_<value>`.
        tolerance_mm: surface Dice tolerance in mm, or organ name -> tolerance (others: 2 mm).
        not_contoured: organs not contoured in this reference: no rows, and their voxels are left
            out of the pixel accuracy.
        case: the case name written in every row.

    Returns:
        One row per organ and metric (`ORGAN_METRICS`), in label order, then the per-case rows
        (`CASE_METRICS`, organ "all").
    """
    ref, pred = np.asarray(ref), np.asarray(pred)
    if ref.shape != pred.shape or ref.ndim != 3:
        raise ValueError(f"reference and prediction must be 3D label maps of one shape, "
                         f"got {ref.shape} and {pred.shape}")
    if ref.dtype.kind not in "biu" or pred.dtype.kind not in "biu":
        raise ValueError(f"label maps must hold integers, got {ref.dtype} and {pred.dtype}")
    spacing = metrics.check_spacing(spacing, 3)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    not_contoured = set(not_contoured)

    # All work happens inside the box holding any foreground: outside it both maps are 0.
    box = metrics.bounding_box(ref | pred, margin=0)
    ref_box, pred_box = (ref[box], pred[box]) if box is not None else (ref[:0, :0, :0], pred[:0, :0, :0])
    if box is not None and (ref_box.min() < 0 or pred_box.min() < 0):
        raise ValueError("label maps must not hold negative values")
    present = _present_boxes(ref_box, pred_box)
    named = organs is not None
    organs = dict(sorted((int(k), str(v)) for k, v in organs.items())) if named else \
        {value: f"label_{value}" for value in sorted(present)}
    if CASE_ORGAN in organs.values():
        raise ValueError(f"'{CASE_ORGAN}' is reserved for per-case rows and cannot name an organ")
    unknown = sorted(set(tolerance_mm) - set(organs.values())) if isinstance(tolerance_mm, Mapping) else []
    if named and unknown:
        raise ValueError(f"surface Dice tolerances given for unknown organs: {unknown}")

    rows: list[Row] = []
    for value, organ in organs.items():
        if organ in not_contoured:
            continue
        if value not in present:
            rows += _empty_organ_rows(case, organ)
            continue
        crop = _grow(present[value], ref_box.shape, margin=1)
        ref_mask, pred_mask = ref_box[crop] == value, pred_box[crop] == value
        tp, fp, fn, tn = metrics.confusion(ref_mask, pred_mask)
        tn += ref.size - ref_mask.size  # every voxel outside the crop is background in both
        distances = metrics.surface_distances(ref_mask, pred_mask, spacing)
        values = {**metrics.overlap_metrics(tp, fp, fn, tn, voxel_ml),
                  **metrics.distance_metrics(*distances, _tolerance(tolerance_mm, organ))}
        rows += _organ_rows(case, organ, values)

    ignore = [v for v, name in organs.items() if name in not_contoured]
    classes = [v for v in organs if v not in ignore]
    accuracy, mean_accuracy = metrics.pixel_accuracy(ref, pred, classes, ignore)
    rows += [{"case": case, "organ": CASE_ORGAN, "metric": "pixel_accuracy", "value": accuracy},
             {"case": case, "organ": CASE_ORGAN, "metric": "mean_pixel_accuracy", "value": mean_accuracy}]
    return rows


def _present_boxes(ref: np.ndarray, pred: np.ndarray) -> dict[int, tuple[slice, ...]]:
    """Label value -> bounding box of that value in ref ∪ pred, for the values present."""
    boxes: dict[int, tuple[slice, ...]] = {}
    if ref.size == 0:
        return boxes
    for array in (ref, pred):
        if array.max() == 0:
            continue
        for value, box in enumerate(ndimage.find_objects(array.astype(np.int32, copy=False)
                                                         if array.dtype.kind == "b" else array), start=1):
            if box is None:
                continue
            if value in boxes:
                box = tuple(slice(min(a.start, b.start), max(a.stop, b.stop))
                            for a, b in zip(boxes[value], box))
            boxes[value] = box
    return boxes


def _grow(box: tuple[slice, ...], shape: tuple[int, ...], margin: int) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))


# ----------------------------------------------------------------------------------------- files


def grid_difference(a: Grid, b: Grid) -> str:
    """What differs between two grids, in words (empty if they match)."""
    if a.matches(b):
        return ""
    parts = []
    if a.shape != b.shape:
        parts.append(f"shape {'x'.join(map(str, a.shape))} vs {'x'.join(map(str, b.shape))}")
    fmt = lambda values: "(" + ", ".join(f"{v:.4g}" for v in values) + ")"  # noqa: E731
    if not np.allclose(a.spacing, b.spacing, rtol=1e-4, atol=1e-5):
        parts.append(f"spacing {fmt(a.spacing)} vs {fmt(b.spacing)} mm")
    if not np.allclose(a.origin, b.origin, atol=1e-3 * max(min(a.spacing), 1e-6)):
        parts.append(f"origin {fmt(a.origin)} vs {fmt(b.origin)} mm")
    if not np.allclose(a.direction, b.direction, atol=1e-4):
        parts.append(f"direction {fmt(a.direction)} vs {fmt(b.direction)}")
    return "; ".join(parts) or "grids differ beyond tolerance"


def evaluate_pairs(pairs: Sequence[Pair],
                   organs: Mapping[int, str] | None = None, tolerance_mm: Tolerance = DEFAULT_TOLERANCE_MM,
                   not_contoured: Mapping[str, Iterable[str]] | None = None) -> list[Row]:
    """Rows of every (case, prediction file, reference file) triple.

    Args:
        pairs: (case name, prediction path, reference path).
        organs: label value -> organ name; None names the values found `label_<value>`, and an
            organ found in some cases only is "empty" in the others.
        tolerance_mm: surface Dice tolerance in mm, or organ name -> tolerance.
        not_contoured: case name -> organs not contoured in that case's reference.

    Raises:
        InputError: a file does not read as a label map, or prediction and reference lie on
            different grids (the message names both files and what differs).
    """
    not_contoured = not_contoured or {}
    per_case: list[list[Row]] = []
    for case, pred_path, ref_path in pairs:
        ref, ref_grid = read_label(ref_path)
        pred, pred_grid = read_label(pred_path)
        difference = grid_difference(pred_grid, ref_grid)
        if difference:
            raise InputError(f"{pred_path} and {ref_path}: prediction and reference lie on different grids "
                             f"({difference}); resample the prediction onto the reference grid")
        per_case.append(evaluate_case(ref, pred, ref_grid.spacing, organs, tolerance_mm,
                                      not_contoured.get(case, ()), case=case))
    if organs is not None:
        return [row for rows in per_case for row in rows]
    # Organs named from the values found: give every case every organ, in label order.
    names = sorted({r["organ"] for rows in per_case for r in rows if r["organ"] != CASE_ORGAN},
                   key=lambda name: int(name.rsplit("_", 1)[1]))
    out = []
    for (case, _, _), rows in zip(pairs, per_case):
        skip = set(not_contoured.get(case, ()))
        by_organ: dict[str, list[Row]] = {}
        for row in rows:
            by_organ.setdefault(row["organ"], []).append(row)
        for name in names:
            if name not in skip:
                out += by_organ.get(name) or _empty_organ_rows(case, name)
        out += by_organ.get(CASE_ORGAN, [])
    return out


def _mask_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and is_image_path(p) and not p.name.startswith("."))


def match_cases(pred: str | Path, ref: str | Path) -> tuple[list[Pair], list[str], list[str]]:
    """Pair prediction and reference files by case name.

    Two files make one pair. Two folders are matched by `case_name`; a prediction `<case>_seg.nii.gz`
    matches the reference `<case>.nii.gz`.

    Returns:
        (pairs as (case, pred, ref), predictions without a reference, references without a prediction).
    """
    pred, ref = Path(pred), Path(ref)
    for path, what in ((pred, "prediction"), (ref, "reference")):
        if not path.exists():
            raise InputError(f"{path}: no such {what} file or folder")
    if pred.is_file() and ref.is_file():
        return [(case_name(ref), pred, ref)], [], []
    if pred.is_file() != ref.is_file():
        raise InputError(f"--pred {pred} and --ref {ref}: give two mask files or two folders, "
                         "not one of each")
    refs = {case_name(p): p for p in _mask_files(ref)}
    if not refs:
        raise InputError(f"{ref}: folder holds no mask files ({', '.join(IMAGE_SUFFIXES)})")
    preds = _predictions(pred, set(refs))
    pairs = [(name, preds[name], refs[name]) for name in sorted(preds) if name in refs]
    return pairs, sorted(set(preds) - set(refs)), sorted(set(refs) - set(preds))


def _predictions(folder: Path, references: set[str]) -> dict[str, Path]:
    """Prediction files of a folder by case name (`<case>_seg` counts as `<case>`)."""
    preds: dict[str, Path] = {}
    files = _mask_files(folder)
    masks = [p for p in files if case_name(p).endswith(PRED_SUFFIX)]
    # A `medseg predict` folder also holds probability maps and viewer copies (.seg.nrrd): its masks
    # are the `<case>_seg` files alone.
    for path in masks or files:
        name = case_name(path)
        if name not in references and name.endswith(PRED_SUFFIX):
            name = name[: -len(PRED_SUFFIX)]
        if name in preds:
            raise InputError(f"{preds[name]} and {path}: two predictions for case '{name}'")
        preds[name] = path
    if not preds:
        raise InputError(f"{folder}: folder holds no mask files ({', '.join(IMAGE_SUFFIXES)})")
    return preds


def is_dataset_folder(path: str | Path) -> bool:
    """A dataset folder (dataset.json, or images/ + labels/) rather than a folder of masks."""
    path = Path(path)
    return (path / "dataset.json").is_file() or ((path / "images").is_dir() and (path / "labels").is_dir())


def match_dataset(pred: str | Path, root: str | Path
                  ) -> tuple[list[Pair], list[str], dict[str, tuple[str, ...] | None]]:
    """Pair a folder of predictions with the labelled cases (training and test) of a dataset folder.

    Returns:
        (pairs as (case, pred, ref), predictions without a labelled case, case -> contoured organs
        or None where the case is fully labelled). Dataset cases without a prediction are not listed:
        evaluating part of a dataset (a validation split) is the usual use.
    """
    from medseg.datasets import load_dataset

    pred = Path(pred)
    if not pred.is_dir():
        raise InputError(f"--pred {pred}: with a dataset folder as --ref, give a folder of predictions")
    cases = {c.name: c for c in load_dataset(root, "train") + load_dataset(root, "test") if c.label is not None}
    preds = _predictions(pred, set(cases))
    pairs = [(name, preds[name], cases[name].label) for name in sorted(preds) if name in cases]
    return pairs, sorted(set(preds) - set(cases)), {name: cases[name].contoured for name, _, _ in pairs}


def read_labels_file(path: str | Path) -> dict[int, str]:
    """Organ names from a JSON/YAML file: `{"1": "prostate"}`, nnU-Net's `{"prostate": 1}`, or a
    dataset.json holding either under "labels". Label 0 (background) is skipped."""
    from medseg.config import read_mapping

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: labels file not found")
    raw = read_mapping(path)
    if isinstance(raw, dict) and isinstance(raw.get("labels"), dict):
        raw = raw["labels"]
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"{path}: expected a mapping of label id to organ name, "
                         "e.g. {\"1\": \"prostate\"}")
    organs: dict[int, str] = {}
    for key, value in raw.items():
        if isinstance(value, str) and str(key).strip().isdigit():
            label, name = int(key), value
        elif isinstance(value, int) and not isinstance(value, bool) and not str(key).strip().isdigit():
            label, name = value, key
        else:
            raise InputError(f"{path}: key '{key}' must map a label id to an organ name "
                             f"(or an organ name to a label id), got {value!r}")
        if label == 0:
            continue
        if not 1 <= label <= 255:
            raise InputError(f"{path}: key '{key}': label id {label} is outside 1..255")
        if label in organs or name in organs.values() or name == CASE_ORGAN:
            raise InputError(f"{path}: key '{key}': label {label} or organ name '{name}' "
                             "is repeated or reserved")
        organs[label] = name
    if not organs:
        raise InputError(f"{path}: names no organ (only background)")
    return dict(sorted(organs.items()))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def run_evaluation(pred: str | Path, ref: str | Path, out: str | Path, task: str | Path | None = None,
                   labels: str | Path | None = None, tolerance_mm: Tolerance = DEFAULT_TOLERANCE_MM,
                   warn: Callable[[str], None] = _stderr) -> dict[str, dict[str, dict]]:
    """`medseg evaluate`: match files, evaluate every pair, write the report into `out`.

    Args:
        pred, ref: two mask files, or two folders matched by case name; or a folder of predictions and
            a dataset folder (see `match_dataset`), whose organs not contoured in a case are skipped.
        out: output folder (metrics.csv, summary.json, dice_boxplot.png).
        task: task name or file giving organ names; or
        labels: JSON/YAML file of label id -> organ name. Neither: the dataset.json's labels when `ref`
            is a dataset that has them, else organs are `label_<value>`.
        tolerance_mm: surface Dice tolerance in mm, or organ name -> tolerance.
        warn: receives one line per problem that does not stop the evaluation (missing partners).

    Returns:
        The summary written to summary.json.
    """
    if task is not None and labels is not None:
        raise InputError("give organ names with --task or with --labels, not both")
    organs = None
    if task is not None:
        from medseg.config import load_task

        organs = load_task(task).label_names
    elif labels is not None:
        organs = read_labels_file(labels)
    not_contoured: dict[str, set[str]] = {}
    if Path(ref).is_dir() and is_dataset_folder(ref):
        pairs, lone_preds, contoured = match_dataset(pred, ref)
        lone_refs: list[str] = []
        if organs is None and (Path(ref) / "dataset.json").is_file():
            organs = read_labels_file(Path(ref) / "dataset.json")
        if organs is None and any(c is not None for c in contoured.values()):
            raise InputError(f"{ref}: cases list 'contoured' organs by name; give --task or --labels to name the "
                             "label values")
        from medseg.partial import uncontoured_organs

        not_contoured = {case: uncontoured_organs(c, organs) for case, c in contoured.items() if c is not None}
    else:
        pairs, lone_preds, lone_refs = match_cases(pred, ref)
    if lone_preds or lone_refs:
        parts = []
        if lone_preds:
            parts.append(f"{len(lone_preds)} prediction(s) in {pred} without a reference: "
                         + ", ".join(lone_preds))
        if lone_refs:
            parts.append(f"{len(lone_refs)} reference(s) in {ref} without a prediction: "
                         + ", ".join(lone_refs))
        warn("warning: " + "; ".join(parts) + " (skipped)")
    if not pairs:
        raise InputError(f"no prediction in {pred} matches a reference in {ref} by case name "
                         f"(unmatched predictions: {', '.join(lone_preds[:5]) or 'none'}; "
                         f"references: {', '.join(lone_refs[:5]) or 'none'})")
    rows = evaluate_pairs(pairs, organs, tolerance_mm, not_contoured)
    return write_report(rows, out)
