"""The dataset check and fingerprint: every file of a dataset read and checked before training, and the
statistics a training plan starts from.

The fingerprint follows nnU-Net's: spacings and shapes are given in RAS axis order (each voxel axis
moved to the closest of right, anterior, superior, as `nibabel.as_closest_canonical` and TorchIO's
`ToCanonical` do) because training resamples every scan to RAS first.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.config import Task
from medseg.data.datasets import LAYOUT_NAMES, Case, absolute, detect_layout, load_dataset
from medseg.errors import InputError
from medseg.io import Grid, read_image, read_label, write_text

FOREGROUND_SAMPLES = 10_000  # foreground voxels drawn per case for intensity statistics


# ----------------------------------------------------------------------------------- fingerprint


@dataclass
class _CaseStats:
    spacing: np.ndarray  # (3,) mm, RAS axis order
    shape: np.ndarray  # (3,) voxels, RAS axis order
    foreground: np.ndarray  # (C, N) intensities of up to FOREGROUND_SAMPLES organ voxels
    volume_ml: dict[str, float]  # organ -> volume in this case
    organs: dict[str, dict | None] = field(default_factory=dict)  # `_organ_stats`; None: organ not contoured


def _ras_axes(grid: Grid) -> list[int]:
    """For each RAS axis, the voxel axis closest to it."""
    from nibabel.orientations import io_orientation

    order = [0, 0, 0]
    for voxel_axis, (ras_axis, _flip) in enumerate(io_orientation(grid.ras_affine)):
        order[int(ras_axis)] = voxel_axis
    return order


def _organ_stats(label: np.ndarray, grid: Grid, task: Task, contoured: tuple[str, ...] | None) -> dict[str, dict | None]:
    """Per organ of one case: volume (mL), size (`medseg.units.voxel_size`: mL, or mm² for a 2D image), the
    sizes of its pieces that may count (`medseg.geometry.significant_pieces`; counted once training's
    typical size is known) and position (world LPS centre, and the S coordinate of its lowest and highest
    voxel, mm); None for an organ the case did not contour. The QA flags of predictions compare against these."""
    from medseg.geometry import PIECE_SHARE, label_boxes, piece_sizes
    from medseg.units import voxel_size

    per_voxel, unit = voxel_size(grid)

    boxes = label_boxes(label, max_label=max(task.label_names))
    found: dict[str, dict | None] = {}
    for lab in task.labels:
        box = boxes[lab.id - 1] if lab.id - 1 < len(boxes) else None
        if contoured is not None and lab.name not in contoured:
            found[lab.name] = None
        elif box is None:
            found[lab.name] = {"volume_ml": 0.0}
        else:
            organ = label[box] == lab.id
            centre, z_low, z_high = world_position(organ, box, grid)
            pieces = piece_sizes(organ)
            found[lab.name] = {"volume_ml": int(organ.sum()) * grid.voxel_volume_ml, "centre": centre, "z_low": z_low,
                               "z_high": z_high, "size": int(organ.sum()) * per_voxel, "unit": unit,
                               "piece_sizes": (pieces[pieces >= PIECE_SHARE * pieces[0]] * per_voxel).tolist()}
    return found


def world_position(organ: np.ndarray, box: tuple[slice, ...], grid: Grid) -> tuple[np.ndarray, float, float]:
    """World LPS centre (mm) of an organ, and the S coordinate (LPS z; + is superior) of its box's lowest
    and highest corner, from its boolean mask cut to `box` of a scan on `grid`."""
    from medseg.geometry import mask_centre

    centre = mask_centre(organ, box)
    corners = np.array(np.meshgrid(*[[s.start, s.stop - 1] for s in box], indexing="ij")).reshape(3, -1)
    world = grid.affine[:3, :3] @ np.c_[np.array(centre), corners] + grid.affine[:3, 3:]
    return world[:, 0], float(world[2, 1:].min()), float(world[2, 1:].max())


def _case_stats(image: np.ndarray, grid: Grid, label: np.ndarray, task: Task, seed: int,
                contoured: tuple[str, ...] | None = None) -> _CaseStats:
    axes = _ras_axes(grid)
    foreground = label > 0
    if task.ignore_label is not None:
        foreground &= label != task.ignore_label
    index = np.flatnonzero(foreground)
    if len(index) > FOREGROUND_SAMPLES:
        index = np.sort(np.random.default_rng(seed).choice(index, FOREGROUND_SAMPLES, replace=False))
    counts = np.bincount(label.ravel(), minlength=256)
    return _CaseStats(spacing=np.asarray(grid.spacing)[axes], shape=np.asarray(grid.shape)[axes],
                      foreground=image.reshape(len(image), -1)[:, index],
                      volume_ml={lab.name: float(counts[lab.id]) * grid.voxel_volume_ml for lab in task.labels},
                      organs=_organ_stats(label, grid, task, contoured))


def _intensity(values: np.ndarray) -> dict[str, float | None]:
    if not values.size:  # no organ voxels anywhere: nothing to normalise with
        return dict.fromkeys(("mean", "std", "p00_5", "p99_5", "min", "max"))
    low, high = np.percentile(values, [0.5, 99.5])
    return {"mean": float(values.mean()), "std": float(values.std()), "p00_5": float(low), "p99_5": float(high),
            "min": float(values.min()), "max": float(values.max())}


def _mm(values: np.ndarray) -> list[float]:
    return np.round(values, 6).tolist()  # NIfTI keeps float32 spacings: 0.8999999761 -> 0.9


def _summarise(stats: list[_CaseStats], task: Task) -> dict:
    if not stats:
        return {"num_cases": 0}
    spacing = np.array([s.spacing for s in stats], dtype=float)
    shape = np.array([s.shape for s in stats], dtype=float)
    median_spacing = np.median(spacing, axis=0)
    volumes = {}
    for organ in (lab.name for lab in task.labels):
        present = [s.volume_ml[organ] for s in stats if s.volume_ml[organ] > 0]
        volumes[organ] = float(np.median(present)) if present else None
    return {
        "num_cases": len(stats),
        "axes": "RAS",  # spacing and shape axis order: after reorienting to the closest RAS
        "median_spacing": _mm(median_spacing),
        "median_shape": np.median(shape, axis=0).tolist(),
        "median_shape_at_median_spacing": np.median(np.round(shape * spacing / median_spacing), axis=0).tolist(),
        "spacing_min": _mm(spacing.min(0)),
        "spacing_max": _mm(spacing.max(0)),
        "shape_min": shape.min(0).astype(int).tolist(),
        "shape_max": shape.max(0).astype(int).tolist(),
        "foreground_intensity": [_intensity(np.concatenate([s.foreground[c] for s in stats]))
                                 for c in range(len(task.channels))],
        "organ_volume_ml": volumes,  # median over the cases where the organ is present; None if in none
        "organ_statistics": {organ: _organ_summary(organ, stats) for organ in (lab.name for lab in task.labels)},
    }


SIGNIFICANT = 6  # digits kept of the fingerprint's organ sizes and distances


def _significant(values) -> list[float]:
    """Values rounded to SIGNIFICANT digits: short in the JSON, and nothing lost at any scale."""
    return [float(f"{float(v):.{SIGNIFICANT}g}") for v in values]


def _organ_summary(organ: str, stats: list[_CaseStats]) -> dict:
    """What training saw of one organ, for the QA flags of predictions (`medseg.infer.qa`).

    `cases` contoured it, `present` had voxels of it; over those: `volume_ml` percentiles (min, p01, p50,
    p99, max; a 2D task's `area_mm2` instead), `one_piece` (share with a single significant piece, judged
    against the median size), `offset_rl_mm`, `offset_ap_mm`, `offset_si_mm` (median distance of its centre
    from the volume-weighted centre of the case's other organs along world LPS x, y, z: + is the patient's
    left, posterior, superior) and `height_si_mm` (median head-foot extent). Sizes and distances keep
    SIGNIFICANT digits, not decimals: a nucleus (80 µm² = 0.00008 mm²) is not stored as 0.
    """
    from medseg.geometry import significant_pieces
    from medseg.units import SIZE_KEYS

    drawn = [s.organs[organ] for s in stats if s.organs.get(organ) is not None]
    present = [(s.organs, o) for s in stats if (o := s.organs.get(organ)) and o["volume_ml"] > 0]
    summary: dict = {"cases": len(drawn), "present": len(present)}
    if not present:
        return summary
    sizes = np.percentile([o["size"] for _, o in present], [0, 1, 50, 99, 100])
    offsets = []
    for organs, o in present:
        others = [v for name, v in organs.items() if name != organ and v and v["volume_ml"] > 0]
        if others:
            centres, weights = np.array([v["centre"] for v in others]), [v["volume_ml"] for v in others]
            offsets.append(o["centre"] - np.average(centres, axis=0, weights=weights))
    middle = _significant(np.median(offsets, axis=0)) if offsets else [None] * 3
    summary[SIZE_KEYS[present[0][1]["unit"]]] = dict(zip(("min", "p01", "p50", "p99", "max"), _significant(sizes)))
    summary.update(one_piece=float(np.mean([significant_pieces(o["piece_sizes"], sizes[2]) == 1 for _, o in present])),
                   **dict(zip(("offset_rl_mm", "offset_ap_mm", "offset_si_mm"), middle)),
                   height_si_mm=_significant([np.median([o["z_high"] - o["z_low"] for _, o in present])])[0])
    return summary


def _check_case(case: Case, task: Task, seed: int) -> tuple[list[str], _CaseStats | None]:
    """Problems with one case (each a line naming the file), and its statistics if it has none."""
    problems = []
    organs = [lab.name for lab in task.labels]
    for organ in case.contoured or ():
        if organ not in organs:
            problems.append(f"{case.images[0]}: case '{case.name}' lists contoured organ '{organ}', which is not "
                            f"an organ of task '{task.name}' ({', '.join(organs)})")
    image = label = None
    try:
        image, grid = read_image(case.images, dimensions=task.dimensions)
    except InputError as error:
        problems.append(str(error))
    found = len(case.images) if image is None else len(image)  # a 2D colour file holds several channels
    if found != len(task.channels):
        problems.insert(0, f"{case.images[0]}: case '{case.name}' has {found} image channel(s), task "
                        f"'{task.name}' expects {len(task.channels)} ({', '.join(task.channels)})")
    if case.label is not None:
        try:
            label, label_grid = read_label(case.label, task.dimensions)
        except InputError as error:
            problems.append(str(error))
    if image is None or label is None:
        return problems, None
    if not grid.matches(label_grid):
        problems.append(f"{case.label}: label grid ({label_grid.describe()}) differs from the image's "
                        f"({grid.describe()})")
        return problems, None
    allowed = {0, *task.label_names} | ({task.ignore_label} if task.ignore_label is not None else set())
    present = [int(v) for v in np.flatnonzero(np.bincount(label.ravel(), minlength=256))]
    unknown = [v for v in present if v not in allowed]
    if unknown:
        problems.append(f"{case.label}: label value(s) {', '.join(map(str, unknown))} are not labels of task "
                        f"'{task.name}' (expected {', '.join(map(str, sorted(allowed)))})")
    if case.contoured is not None:
        drawn = [task.label_names[v] for v in present if v in task.label_names]
        extra = [organ for organ in drawn if organ not in case.contoured]
        if extra:
            problems.append(f"{case.label}: has voxels of {', '.join(extra)}, which its 'contoured' list leaves out")
    return problems, (None if problems else _case_stats(image, grid, label, task, seed, case.contoured))


def compute_fingerprint(cases: list[Case], task: Task) -> dict:
    """Dataset statistics that planning and normalisation need (as nnU-Net's dataset fingerprint).

    Keys: `num_cases`; `median_spacing`, `spacing_min`, `spacing_max` (mm) and `median_shape`,
    `median_shape_at_median_spacing`, `shape_min`, `shape_max` (voxels), all in RAS axis order;
    `foreground_intensity`, per channel, `mean`, `std`, `p00_5`, `p99_5`, `min`, `max` over up to
    10,000 sampled organ voxels per case; `organ_volume_ml`, organ -> median volume;
    `organ_statistics`, organ -> what training saw of it (`_organ_summary`: volume range, pieces,
    position relative to the other organs), which the QA flags of predictions compare against.

    Raises:
        InputError: the first problem of the first case that has one (`check_dataset` lists them all).
    """
    stats = []
    for index, case in enumerate(cases):
        problems, case_stats = _check_case(case, task, seed=index)
        if problems:
            raise InputError(f"{problems[0]} (run `medseg check-dataset` to list every problem)")
        if case_stats is None:
            raise InputError(f"{case.images[0]}: case '{case.name}' has no label map to take statistics from")
        stats.append(case_stats)
    if not stats:
        raise InputError("no cases to compute a dataset fingerprint from")
    if not any(s.foreground.size for s in stats):
        raise InputError(f"{cases[0].label.parent}: no label map has any organ voxel; nothing to learn from")
    return _summarise(stats, task)


# ----------------------------------------------------------------------------------------- check


@dataclass
class DatasetReport:
    root: Path
    layout: str  # "MSD", "nnU-Net v2" or "images/ + labels/"
    task: str
    num_cases: int  # training cases found (test cases are checked but not counted)
    problems: list[str] = field(default_factory=list)  # one line each, naming the file
    fingerprint: dict = field(default_factory=dict)  # see `compute_fingerprint`; from problem-free cases
    fingerprint_path: Path | None = None  # where the fingerprint was written; None: not written

    def summary(self) -> str:
        fp = self.fingerprint
        lines = [f"{self.root}: {self.layout} dataset, {self.num_cases} training cases, task '{self.task}'"]
        if fp.get("num_cases"):
            of = "" if fp["num_cases"] == self.num_cases else f" (over the {fp['num_cases']} cases without problems)"
            lines.append(f"spacing (mm, RAS): {_xyz(fp['spacing_min'])} to {_xyz(fp['spacing_max'])}, "
                         f"median {_xyz(fp['median_spacing'])}{of}")
            lines.append(f"size (voxels, RAS): {_xyz(fp['shape_min'])} to {_xyz(fp['shape_max'])}, "
                         f"median {_xyz(fp['median_shape'])}")
        lines += [f"problem: {p}" for p in self.problems]
        if self.fingerprint_path:
            lines.append(f"fingerprint: {self.fingerprint_path}")
        else:
            lines.append("fingerprint not written: fix the problems first")
        n = len(self.problems)
        lines.append(f"{n} problem{'s' if n != 1 else ''}" if n else "OK")
        return "\n".join(lines)


def _xyz(values: list[float]) -> str:
    return "x".join(f"{v:.3g}" for v in values)


def default_fingerprint_path(root: str | Path) -> Path:
    """`./<dataset folder name>_fingerprint.json`: in the working folder, never inside the dataset."""
    return Path.cwd() / f"{absolute(root).name or 'dataset'}_fingerprint.json"


def _fingerprint_target(root: Path, given: str | Path | None) -> Path:
    """Where to write the fingerprint, refused up front if that cannot work (before minutes of reading)."""
    path = default_fingerprint_path(root) if given is None else absolute(given)
    if path.is_dir():
        path = path / default_fingerprint_path(root).name
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"cannot write {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise InputError(f"cannot write {path}: folder {parent} is not writable")
            break
    return path


def check_dataset(root: str | Path, task: Task, fingerprint_path: str | Path | None = None) -> DatasetReport:
    """Check every case of a dataset against a task, collecting all problems, and fingerprint it.

    Each file must read as an image of the task's dimensions (3D, or 2D for `dimensions: 2`) without
    NaN/inf, each case must have the task's channels (an RGB file is three), a label
    map on the image's grid with only the task's label values (plus 0 and `ignore_label`), and
    `contoured` organs that the task knows. Test cases, where the dataset has some, are checked too.
    The fingerprint (training cases) is written as JSON to `fingerprint_path` (a file, or a folder
    to write `<dataset>_fingerprint.json` in; default `default_fingerprint_path(root)`) only when
    there is no problem. The dataset folder itself is never written to.

    Raises:
        InputError: the dataset cannot be listed (see `load_dataset`) or the fingerprint cannot be written.
    """
    root = absolute(root)
    target = _fingerprint_target(root, fingerprint_path)
    layout, _ = detect_layout(root)
    problems, stats = [], []
    cases = load_dataset(root, "train", problems)  # unusable entries become problems, the rest are checked
    for index, case in enumerate(cases):
        case_problems, case_stats = _check_case(case, task, seed=index)
        problems += case_problems
        if case_stats is not None:
            stats.append(case_stats)
    for case in load_dataset(root, "test", problems):
        problems += _check_case(case, task, seed=0)[0]
    if not cases and not problems:
        problems.append(f"{root}: the dataset has no training cases")
    fingerprint = _summarise(stats, task)
    if stats and not any(s.foreground.size for s in stats):
        problems.append(f"{root}: no label map has any organ voxel; nothing to learn from")
    prefix = f"{root}{os.sep}"
    problems = [" ".join(p.replace(prefix, "").split()) for p in problems]  # one line each, paths relative
    report = DatasetReport(root, LAYOUT_NAMES[layout], task.name, len(cases), problems, fingerprint)
    if not problems:
        report.fingerprint_path = write_text(json.dumps(fingerprint, indent=2) + "\n", target)
    return report
