"""Case rows: predicted masks scored against references, one row per case, organ and metric.

`evaluate_case` turns one (reference, prediction) pair of label maps into rows
`{"case", "organ", "metric", "value"}`; `evaluate_pairs` does it for files, checking that both lie on
the same grid. `medseg.evaluate.matching` pairs the files, `medseg.evaluate.report` writes the rows
and `medseg.evaluate.run.run_evaluation` is `medseg evaluate`.

Per organ: dice, iou, precision, recall, specificity, volume_ref_ml, volume_pred_ml,
relative_volume_difference, hd95_mm, hd_mm, assd_mm, surface_dice. Per case (organ "all"):
pixel_accuracy and mean_pixel_accuracy. A 2D image ((X, Y, 1), `medseg.planar`) has area_ref_mm2 and
area_pred_mm2 instead of the volumes, and in-plane surface distances. Definitions and the empty-mask conventions are in
`medseg.evaluate.metrics`: an organ absent from both masks is "empty" (NaN Dice), left out of every mean and
counted as `n_empty`; an organ absent from one mask scores Dice 0 and distance `inf`, and the
summary leaves `inf` out of mean/std/median and counts it as `n_inf`.

Surface Dice tolerance per organ (`surface_tolerances`): the task file's `tolerance_mm` for the
organ (head and neck: inter-observer variation from Nikolov et al. 2021), else the 2 mm fallback;
reports say which (`tolerance_source`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Union

import numpy as np

from medseg.config import CASE_ORGAN
from medseg.errors import InputError
from medseg.evaluate import metrics
from medseg.evaluate.matching import Pair
from medseg.evaluate.report import Row
from medseg.geometry import bounding_box, grow, organ_boxes
from medseg.io import Grid, read_label
from medseg.planar import is_planar

DEFAULT_TOLERANCE_MM = 2.0  # surface Dice tolerance when none is given for an organ
FALLBACK_SOURCE = f"fallback {DEFAULT_TOLERANCE_MM:g} mm"  # `tolerance_source` of an organ given none
ORGAN_METRICS = ("dice", "iou", "precision", "recall", "specificity", "volume_ref_ml", "volume_pred_ml",
                 "relative_volume_difference", "hd95_mm", "hd_mm", "assd_mm", "surface_dice")
CASE_METRICS = ("pixel_accuracy", "mean_pixel_accuracy")
AREAS = {"volume_ref_ml": "area_ref_mm2", "volume_pred_ml": "area_pred_mm2"}  # a 2D image's sizes

Tolerance = Union[float, Mapping[str, float]]  # mm, one for all organs or organ name -> mm
OnPair = Callable[[str, np.ndarray, np.ndarray, Grid], None]  # (case, reference, prediction, grid)


def task_tolerances(labels: Iterable) -> dict[str, float]:
    """Organ name -> surface Dice tolerance (mm) of the task's labels (`config.Label`) that give one."""
    return {label.name: float(label.tolerance_mm) for label in labels if label.tolerance_mm is not None}


def surface_tolerances(organs: Iterable[str], from_task: Mapping[str, float] | None = None,
                       given: Tolerance | None = None) -> dict[str, tuple[float, str]]:
    """Organ -> (surface Dice tolerance in mm, where it came from: "given", "task file" or the fallback).

    A tolerance `given` as an argument wins, then the task file's `tolerance_mm`, then the fallback.
    """
    table = {}
    for organ in organs:
        if given is not None and (not isinstance(given, Mapping) or organ in given):
            table[organ] = (_tolerance(given, organ), "given")
        elif organ in (from_task or {}):
            table[organ] = (float(from_task[organ]), "task file")
        else:
            table[organ] = (DEFAULT_TOLERANCE_MM, FALLBACK_SOURCE)
    return table


# ------------------------------------------------------------------------------------------ rows


def _tolerance(tolerance_mm: Tolerance, organ: str) -> float:
    if isinstance(tolerance_mm, Mapping):
        return float(tolerance_mm.get(organ, DEFAULT_TOLERANCE_MM))
    return float(tolerance_mm)


def _organ_rows(case: str, organ: str, values: Mapping[str, float], planar: bool = False) -> list[Row]:
    """One row per metric; a 2D image's volumes are its areas (the values, in mm2, computed from pixel areas)."""
    return [{"case": case, "organ": organ, "metric": AREAS.get(m, m) if planar else m, "value": float(values[m])}
            for m in ORGAN_METRICS]


def _empty_organ_rows(case: str, organ: str, planar: bool = False) -> list[Row]:
    """Rows of an organ absent from both masks (they do not depend on the volume)."""
    none = np.zeros(0)
    values = {**metrics.overlap_metrics(0, 0, 0, 1, 1.0),
              **metrics.distance_metrics(none, none, DEFAULT_TOLERANCE_MM)}
    return _organ_rows(case, organ, values, planar)


def _check_maps(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> tuple[float, ...]:
    """The spacing as three floats, once both maps are known to be integer 3D maps of one shape."""
    if ref.shape != pred.shape or ref.ndim != 3:
        raise ValueError(f"reference and prediction must be 3D label maps of one shape, "
                         f"got {ref.shape} and {pred.shape}")
    if ref.dtype.kind not in "biu" or pred.dtype.kind not in "biu":
        raise ValueError(f"label maps must hold integers, got {ref.dtype} and {pred.dtype}")
    return metrics.check_spacing(spacing, 3)


def _organ_names(organs: Mapping[int, str] | None, present: Mapping[int, tuple[slice, ...]],
                 tolerance_mm: Tolerance) -> dict[int, str]:
    """Label value -> organ name, in label order: the given names, or `label_<value>` for the values present."""
    named = organs is not None
    organs = dict(sorted((int(k), str(v)) for k, v in organs.items())) if named else \
        {value: f"label_{value}" for value in sorted(present)}
    if CASE_ORGAN in organs.values():
        raise ValueError(f"'{CASE_ORGAN}' is reserved for per-case rows and cannot name an organ")
    unknown = sorted(set(tolerance_mm) - set(organs.values())) if isinstance(tolerance_mm, Mapping) else []
    if named and unknown:
        raise ValueError(f"surface Dice tolerances given for unknown organs: {unknown}")
    return organs


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
    spacing = _check_maps(ref, pred, spacing)
    planar = is_planar(ref.shape)
    voxel_ml = spacing[0] * spacing[1] if planar else float(np.prod(spacing)) / 1000.0  # 2D: mm2 per pixel
    not_contoured = set(not_contoured)

    # All work happens inside the box holding any foreground: outside it both maps are 0. One voxel
    # more keeps the box of a 3D scan two slices thick at least: one slice would read as a 2D image.
    box = bounding_box(ref | pred, margin=1)
    ref_box, pred_box = (ref[box], pred[box]) if box is not None else (ref[:0, :0, :0], pred[:0, :0, :0])
    if box is not None and (ref_box.min() < 0 or pred_box.min() < 0):
        raise ValueError("label maps must not hold negative values")
    present = organ_boxes(ref_box, pred_box)
    organs = _organ_names(organs, present, tolerance_mm)

    rows: list[Row] = []
    for value, organ in organs.items():
        if organ in not_contoured:
            continue
        if value not in present:
            rows += _empty_organ_rows(case, organ, planar)
            continue
        crop = grow(present[value], ref_box.shape, 1)
        ref_mask, pred_mask = ref_box[crop] == value, pred_box[crop] == value
        tp, fp, fn, tn = metrics.confusion(ref_mask, pred_mask)
        tn += ref.size - ref_mask.size  # every voxel outside the crop is background in both
        distances = metrics.surface_distances(ref_mask, pred_mask, spacing)
        values = {**metrics.overlap_metrics(tp, fp, fn, tn, voxel_ml),
                  **metrics.distance_metrics(*distances, _tolerance(tolerance_mm, organ))}
        rows += _organ_rows(case, organ, values, planar)

    ignore = [v for v, name in organs.items() if name in not_contoured]
    classes = [v for v in organs if v not in ignore]
    accuracy, mean_accuracy = metrics.pixel_accuracy(ref, pred, classes, ignore)
    rows += [{"case": case, "organ": CASE_ORGAN, "metric": "pixel_accuracy", "value": accuracy},
             {"case": case, "organ": CASE_ORGAN, "metric": "mean_pixel_accuracy", "value": mean_accuracy}]
    return rows


def evaluate_pairs(pairs: Sequence[Pair],
                   organs: Mapping[int, str] | None = None, tolerance_mm: Tolerance = DEFAULT_TOLERANCE_MM,
                   not_contoured: Mapping[str, Iterable[str]] | None = None,
                   on_pair: OnPair | None = None) -> list[Row]:
    """Rows of every (case, prediction file, reference file) triple.

    Args:
        pairs: (case name, prediction path, reference path).
        organs: label value -> organ name; None names the values found `label_<value>`, and an
            organ found in some cases only is "empty" in the others.
        tolerance_mm: surface Dice tolerance in mm, or organ name -> tolerance.
        not_contoured: case name -> organs not contoured in that case's reference.
        on_pair: called with each case's (name, reference, prediction, grid) once read and checked,
            so that other reports (slice-wise) reuse the read.

    Raises:
        InputError: a file does not read as a label map, or prediction and reference lie on
            different grids (the message names both files and what differs).
    """
    not_contoured = not_contoured or {}
    per_case: list[list[Row]] = []
    for case, pred_path, ref_path in pairs:
        ref, ref_grid = read_label(ref_path, dimensions=None)  # 2D or 3D: the two grids must match
        pred, pred_grid = read_label(pred_path, dimensions=None)
        difference = pred_grid.difference(ref_grid)
        if difference:
            raise InputError(f"{pred_path} and {ref_path}: prediction and reference lie on different grids "
                             f"({difference}); resample the prediction onto the reference grid")
        per_case.append(evaluate_case(ref, pred, ref_grid.spacing, organs, tolerance_mm,
                                      not_contoured.get(case, ()), case=case))
        if on_pair is not None:
            on_pair(case, ref, pred, ref_grid)
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
        planar = any(row["metric"] in AREAS.values() for row in rows)
        for name in names:
            if name not in skip:
                out += by_organ.get(name) or _empty_organ_rows(case, name, planar)
        out += by_organ.get(CASE_ORGAN, [])
    return out


