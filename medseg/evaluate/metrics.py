"""Segmentation metrics: pure functions on numpy arrays, with the voxel spacing passed in.

Overlap metrics are built on confusion counts (`confusion` -> tp, fp, fn, tn), as in nnU-Net.
Surface metrics are built on the two sets of directed surface distances (`surface_distances`), as in
MONAI and DeepMind's `surface-distance`:

- The surface of a mask is its voxels with at least one face (6-)neighbour outside the mask, i.e.
  `mask XOR binary_erosion(mask)` with a cross structuring element; outside the array counts as
  outside the mask. This is exactly MONAI's `get_mask_edges` with its default `spacing=None`.
- The distance from a surface voxel of A to B is the Euclidean distance, in mm (anisotropic spacing
  applied), from its centre to the nearest surface voxel centre of B. scipy's exact
  `distance_transform_edt(sampling=spacing)` computes it, on the bounding box of A ∪ B plus a
  one-voxel margin: the nearest surface voxel always lies in that box, so cropping changes no value
  and only saves time.
- HD (maximum) is the largest distance in either direction. HD95 is, like MONAI's, the larger of the
  two directed 95th percentiles (linear interpolation, `np.percentile`/`torch.quantile`), not the
  95th percentile of the pooled distances. ASSD is the mean of all distances of both directions
  pooled (MONAI `symmetric=True`). Normalised surface Dice at tolerance τ mm is the share of surface
  voxels of both masks within τ of the other surface (MONAI `use_subvoxels=False`; DeepMind's
  version weights voxels by surface area instead).
- A 2D image is held as (X, Y, 1) (`medseg.planar`): its surface is its in-plane contour (4-neighbours),
  and its distances are in-plane. Outside the array along the singleton axis would otherwise make every
  pixel a surface voxel.

Empty masks (an organ absent from the reference, the prediction or both):

- Absent in both: Dice, IoU, precision, recall, relative volume difference and every distance are
  NaN ("empty"); volumes are 0 and specificity is 1. Reports leave such (case, organ) pairs out of
  every mean and count them as `n_empty`.
- Absent in exactly one: Dice = IoU = surface Dice = 0; HD, HD95 and ASSD are `inf` (the distance
  to an empty set); precision (empty prediction) or recall (empty reference) is NaN, being 0/0;
  relative volume difference is -1 (missed) or `inf` (reference empty). Reports keep `inf` in the
  per-case table, leave it out of mean/std/median and count it as `n_inf`.

Distances vs SimpleITK's `HausdorffDistanceImageFilter`: SimpleITK measures from every voxel of A to
the nearest voxel of B (0 inside B). For a voxel of A outside B the nearest voxel of B is a surface
voxel, so both agree there. They differ where a surface voxel of A lies inside B (a hole or cavity
in A): the surface definition counts its distance to B's surface, SimpleITK counts 0; and, rarely,
where the voxel of A farthest from B is not on A's surface. For solid shapes both HDs are equal
(tested on ellipsoids, nested shapes, masks cut by the array border and random masks).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

from medseg.geometry import bounding_box
from medseg.planar import is_planar

# Face (6-)connectivity: a voxel is on the surface if one of its 6 face neighbours is outside.
_FACE = ndimage.generate_binary_structure(3, 1)


def check_spacing(spacing: Sequence[float], ndim: int = 3) -> tuple[float, ...]:
    """The voxel size as `ndim` positive floats (mm), or a `ValueError` naming what was given."""
    values = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=float), (ndim,)))
    if not all(np.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be {ndim} positive millimetre values, got {spacing}")
    return values


def _check_pair(ref: np.ndarray, pred: np.ndarray) -> None:
    if ref.shape != pred.shape:
        raise ValueError(f"reference and prediction must have the same shape, got {ref.shape} and "
                         f"{pred.shape}")


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is 0 (the metric is undefined)."""
    return float(numerator) / float(denominator) if denominator else float("nan")


# ---------------------------------------------------------------------------------- label maps


# ------------------------------------------------------------------------------------- overlap


def confusion(ref_mask: np.ndarray, pred_mask: np.ndarray) -> tuple[int, int, int, int]:
    """Voxel counts (tp, fp, fn, tn) of a binary prediction against a binary reference.

    Args:
        ref_mask: reference mask (X, Y, Z); nonzero is inside.
        pred_mask: predicted mask, same shape.
    """
    ref_mask, pred_mask = np.asarray(ref_mask, dtype=bool), np.asarray(pred_mask, dtype=bool)
    _check_pair(ref_mask, pred_mask)
    tp = int(np.count_nonzero(ref_mask & pred_mask))
    n_ref, n_pred = int(np.count_nonzero(ref_mask)), int(np.count_nonzero(pred_mask))
    fp, fn = n_pred - tp, n_ref - tp
    return tp, fp, fn, ref_mask.size - tp - fp - fn


def dice(tp: int, fp: int, fn: int) -> float:
    """2TP / (2TP + FP + FN); NaN when both masks are empty, 0 when exactly one is."""
    return _ratio(2 * tp, 2 * tp + fp + fn)


def jaccard(tp: int, fp: int, fn: int) -> float:
    """IoU = TP / (TP + FP + FN); NaN when both masks are empty, 0 when exactly one is."""
    return _ratio(tp, tp + fp + fn)


def precision(tp: int, fp: int) -> float:
    """TP / (TP + FP); NaN for an empty prediction."""
    return _ratio(tp, tp + fp)


def recall(tp: int, fn: int) -> float:
    """Sensitivity TP / (TP + FN); NaN for an empty reference."""
    return _ratio(tp, tp + fn)


def specificity(tn: int, fp: int) -> float:
    """TN / (TN + FP); NaN only if the reference fills the whole volume."""
    return _ratio(tn, tn + fp)


def relative_volume_difference(ref_volume: float, pred_volume: float) -> float:
    """(pred - ref) / ref: NaN if both are 0, inf if only the reference is 0."""
    if ref_volume == 0:
        return float("nan") if pred_volume == 0 else float("inf")
    return (pred_volume - ref_volume) / ref_volume


def overlap_metrics(tp: int, fp: int, fn: int, tn: int, voxel_ml: float) -> dict[str, float]:
    """Every count-based metric of one organ; `voxel_ml` is the volume of one voxel in mL."""
    ref_ml, pred_ml = (tp + fn) * voxel_ml, (tp + fp) * voxel_ml
    return {
        "dice": dice(tp, fp, fn),
        "iou": jaccard(tp, fp, fn),
        "precision": precision(tp, fp),
        "recall": recall(tp, fn),
        "specificity": specificity(tn, fp),
        "volume_ref_ml": ref_ml,
        "volume_pred_ml": pred_ml,
        "relative_volume_difference": relative_volume_difference(ref_ml, pred_ml),
    }


def pixel_accuracy(ref: np.ndarray, pred: np.ndarray, classes: Iterable[int],
                   ignore: Iterable[int] = ()) -> tuple[float, float]:
    """Voxel accuracy of a label map, and its mean over classes (background included).

    Values not in `classes` count as background (0). Voxels labelled with an `ignore` value in either
    map (organs not contoured in this case) are left out. The mean over classes averages each class's
    recall (share of its reference voxels labelled right) over the classes present in the reference.

    Args:
        ref: reference label map (X, Y, Z), integer values.
        pred: predicted label map, same shape.
        classes: organ label values (0 is implied).
        ignore: label values whose voxels are left out.

    Returns:
        (accuracy, mean accuracy over classes); NaN if no voxel is left.
    """
    ref, pred = np.asarray(ref), np.asarray(pred)
    _check_pair(ref, pred)
    if ref.dtype.kind not in "biu" or pred.dtype.kind not in "biu":
        raise ValueError(f"label maps must hold integers, got {ref.dtype} and {pred.dtype}")
    classes = sorted({int(c) for c in classes} - {0})
    ignore = sorted({int(c) for c in ignore} - {0})
    # Only voxels inside the bounding box of any foreground can disagree; outside it both are 0.
    box = bounding_box(ref | pred, margin=0)
    both_background = ref.size
    if box is not None:
        r, p = ref[box].ravel(), pred[box].ravel()
        both_background -= r.size
        keep = ~(np.isin(r, ignore) | np.isin(p, ignore)) if ignore else slice(None)
        r = np.where(np.isin(r, classes), r, 0)[keep]
        p = np.where(np.isin(p, classes), p, 0)[keep]
    else:
        r = p = np.zeros(0, dtype=ref.dtype)
    total = both_background + r.size
    correct = both_background + int(np.count_nonzero(r == p))
    recalls = []
    for c in [0, *classes]:
        in_ref = r == c
        hits = int(np.count_nonzero(in_ref & (p == c))) + (both_background if c == 0 else 0)
        n_ref = int(np.count_nonzero(in_ref)) + (both_background if c == 0 else 0)
        if n_ref:
            recalls.append(hits / n_ref)
    return _ratio(correct, total), float(np.mean(recalls)) if recalls else float("nan")


# ------------------------------------------------------------------------------------- surface


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of a binary mask with a face neighbour outside it (outside the array is outside); a 2D
    image held as (X, Y, 1) counts in-plane neighbours only."""
    mask = np.asarray(mask, dtype=bool)
    if is_planar(mask.shape):
        return surface(mask[..., 0])[..., None]
    structure = _FACE if mask.ndim == 3 else ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(ref_mask: np.ndarray, pred_mask: np.ndarray,
                      spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (reference surface -> prediction surface, and back).

    Each voxel of one surface gets its distance to the nearest voxel of the other. Distances to an
    empty surface are `inf`; from an empty surface there are none (an empty array).

    Args:
        ref_mask: reference mask (X, Y, Z); nonzero is inside.
        pred_mask: predicted mask, same shape.
        spacing: voxel size in mm along X, Y, Z.

    Returns:
        (ref_to_pred, pred_to_ref): float64 arrays, one value per surface voxel.
    """
    ref_mask, pred_mask = np.asarray(ref_mask, dtype=bool), np.asarray(pred_mask, dtype=bool)
    _check_pair(ref_mask, pred_mask)
    spacing = check_spacing(spacing, ref_mask.ndim)
    if is_planar(ref_mask.shape):  # a 2D image: in-plane contours and distances
        ref_mask, pred_mask, spacing = ref_mask[..., 0], pred_mask[..., 0], spacing[:2]
    box = bounding_box(ref_mask | pred_mask, margin=1)
    if box is None:
        return np.zeros(0), np.zeros(0)
    ref_surface, pred_surface = surface(ref_mask[box]), surface(pred_mask[box])
    return _to_surface(ref_surface, pred_surface, spacing), _to_surface(pred_surface, ref_surface, spacing)


def _to_surface(source: np.ndarray, target: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    n = int(np.count_nonzero(source))
    if not target.any():
        return np.full(n, np.inf)
    if n == 0:
        return np.zeros(0)
    return ndimage.distance_transform_edt(~target, sampling=spacing)[source]


def hausdorff(ref_to_pred: np.ndarray, pred_to_ref: np.ndarray, percentile: float | None = None) -> float:
    """Symmetric Hausdorff distance: the larger of the two directed maxima (or percentiles).

    `percentile=95` gives HD95 as MONAI defines it (the larger of the two directed 95th percentiles).
    NaN when both surfaces are empty, inf when exactly one is.
    """
    directed = [d for d in (ref_to_pred, pred_to_ref) if d.size]
    if not directed:
        return float("nan")
    if any(np.isinf(d).any() for d in directed):
        return float("inf")
    if percentile is None:
        return float(max(d.max() for d in directed))
    return float(max(np.percentile(d, percentile) for d in directed))


def average_symmetric_surface_distance(ref_to_pred: np.ndarray, pred_to_ref: np.ndarray) -> float:
    """Mean of all surface distances of both directions pooled; NaN if both surfaces are empty."""
    pooled = np.concatenate([ref_to_pred, pred_to_ref])
    return float(pooled.mean()) if pooled.size else float("nan")


def surface_dice(ref_to_pred: np.ndarray, pred_to_ref: np.ndarray, tolerance_mm: float) -> float:
    """Normalised surface Dice: share of both surfaces' voxels within `tolerance_mm` of the other
    surface. NaN if both surfaces are empty, 0 if exactly one is."""
    if not np.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ValueError(f"surface Dice tolerance must be a finite, non-negative number of mm, "
                         f"got {tolerance_mm}")
    total = ref_to_pred.size + pred_to_ref.size
    within = np.count_nonzero(ref_to_pred <= tolerance_mm) + np.count_nonzero(pred_to_ref <= tolerance_mm)
    return _ratio(within, total)


def distance_metrics(ref_to_pred: np.ndarray, pred_to_ref: np.ndarray,
                     tolerance_mm: float) -> dict[str, float]:
    """Every surface metric of one organ from its directed surface distances (mm)."""
    return {
        "hd95_mm": hausdorff(ref_to_pred, pred_to_ref, percentile=95),
        "hd_mm": hausdorff(ref_to_pred, pred_to_ref),
        "assd_mm": average_symmetric_surface_distance(ref_to_pred, pred_to_ref),
        "surface_dice": surface_dice(ref_to_pred, pred_to_ref, tolerance_mm),
    }
