"""Metrics against hand-worked cases and independent implementations (SimpleITK, MONAI)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.evaluate import metrics

SPACING = (0.8, 1.1, 2.5)  # mm, anisotropic on purpose
SHAPE = (48, 40, 24)
NAN, INF = float("nan"), float("inf")


def ellipsoid(centre_mm, radii_mm, shape=SHAPE, spacing=SPACING) -> np.ndarray:
    axes = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum(((a - c) / r) ** 2 for a, c, r in zip(axes, centre_mm, radii_mm)) <= 1


def all_metrics(ref, pred, spacing, tolerance_mm=2.0) -> dict[str, float]:
    tp, fp, fn, tn = metrics.confusion(ref, pred)
    voxel_ml = float(np.prod(spacing)) / 1000
    return {**metrics.overlap_metrics(tp, fp, fn, tn, voxel_ml),
            **metrics.distance_metrics(*metrics.surface_distances(ref, pred, spacing), tolerance_mm)}


def assert_values(got: dict, expected: dict, tol: float = 1e-12) -> None:
    for key, want in expected.items():
        value = got[key]
        if math.isnan(want):
            assert math.isnan(value), f"{key}: expected NaN, got {value}"
        else:
            assert value == pytest.approx(want, abs=tol), f"{key}: expected {want}, got {value}"


def cube(*voxels) -> np.ndarray:
    """A 2x2x2 mask with the given voxels set."""
    mask = np.zeros((2, 2, 2), bool)
    for voxel in voxels:
        mask[voxel] = True
    return mask


# ------------------------------------------------------------------------------ hand-worked 2x2x2

# Spacing (1, 2, 3) mm: one voxel is 6 mm³ = 0.006 mL. In a 2x2x2 volume every foreground voxel is
# a surface voxel (it has a face on the array border).
HAND = (1.0, 2.0, 3.0)
X0 = [(0, y, z) for y in (0, 1) for z in (0, 1)]  # the x = 0 half
Y0 = [(x, 0, z) for x in (0, 1) for z in (0, 1)]  # the y = 0 half


@pytest.mark.parametrize("ref, pred, expected", [
    pytest.param(cube(), cube(), dict(dice=NAN, iou=NAN, precision=NAN, recall=NAN, specificity=1.0,
                                      volume_ref_ml=0.0, volume_pred_ml=0.0, relative_volume_difference=NAN,
                                      hd95_mm=NAN, hd_mm=NAN, assd_mm=NAN, surface_dice=NAN), id="both-empty"),
    pytest.param(cube((0, 0, 0)), cube(), dict(dice=0.0, iou=0.0, precision=NAN, recall=0.0, specificity=1.0,
                                                volume_ref_ml=0.006, volume_pred_ml=0.0, relative_volume_difference=-1.0,
                                                hd95_mm=INF, hd_mm=INF, assd_mm=INF, surface_dice=0.0), id="one-empty-pred"),
    pytest.param(cube(), cube((1, 1, 1)), dict(dice=0.0, iou=0.0, precision=0.0, recall=NAN, specificity=7 / 8,
                                               volume_ref_ml=0.0, volume_pred_ml=0.006, relative_volume_difference=INF,
                                               hd95_mm=INF, hd_mm=INF, assd_mm=INF, surface_dice=0.0), id="one-empty-ref"),
    # tp=2 fp=2 fn=2 tn=2. Reference surface -> prediction: 0, 0, 2, 2 mm (one step along y);
    # prediction -> reference: 0, 0, 1, 1 mm (one step along x). HD95 = max(p95 of each) = 2;
    # ASSD = 6 / 8; surface Dice at 1.5 mm: (2 + 4) / 8.
    pytest.param(cube(*X0), cube(*Y0), dict(dice=0.5, iou=1 / 3, precision=0.5, recall=0.5, specificity=0.5,
                                            volume_ref_ml=0.024, volume_pred_ml=0.024, relative_volume_difference=0.0,
                                            hd95_mm=2.0, hd_mm=2.0, assd_mm=0.75, surface_dice=0.75), id="half-overlap"),
    pytest.param(cube(*X0), cube(*X0), dict(dice=1.0, iou=1.0, precision=1.0, recall=1.0, specificity=1.0,
                                            hd95_mm=0.0, hd_mm=0.0, assd_mm=0.0, surface_dice=1.0), id="identical"),
    # Opposite corners: sqrt(1² + 2² + 3²) mm apart, beyond the 1.5 mm tolerance.
    pytest.param(cube((0, 0, 0)), cube((1, 1, 1)), dict(dice=0.0, iou=0.0, precision=0.0, recall=0.0,
                                                        specificity=6 / 7, hd95_mm=14 ** 0.5, hd_mm=14 ** 0.5,
                                                        assd_mm=14 ** 0.5, surface_dice=0.0), id="opposite-corners"),
    # Reference x=0 half, prediction one voxel of it: precision 1, recall 1/4; the other three
    # reference voxels lie 2 mm (y), 3 mm (z) and sqrt(13) mm (y and z) from it.
    pytest.param(cube(*X0), cube((0, 0, 0)), dict(dice=2 / 5, iou=1 / 4, precision=1.0, recall=0.25,
                                                  specificity=1.0, relative_volume_difference=-0.75,
                                                  hd_mm=13 ** 0.5, assd_mm=(0 + 2 + 3 + 13 ** 0.5 + 0) / 5,
                                                  surface_dice=2 / 5), id="pred-inside-ref"),
])
def test_hand_worked(ref, pred, expected):
    assert_values(all_metrics(ref, pred, HAND, tolerance_mm=1.5), expected)


def test_confusion_counts_every_voxel():
    assert metrics.confusion(cube(*X0), cube(*Y0)) == (2, 2, 2, 2)
    assert metrics.confusion(cube(), cube()) == (0, 0, 0, 8)


def test_hd95_is_the_larger_directed_percentile():
    # 20 reference surface distances 0..19 mm one way, one distance the other way.
    ref_to_pred, pred_to_ref = np.arange(20.0), np.array([3.0])
    assert metrics.hausdorff(ref_to_pred, pred_to_ref, percentile=95) == pytest.approx(np.percentile(ref_to_pred, 95))
    assert metrics.hausdorff(ref_to_pred, pred_to_ref) == 19.0
    assert metrics.average_symmetric_surface_distance(ref_to_pred, pred_to_ref) == pytest.approx((190 + 3) / 21)


def test_surface_dice_rejects_negative_tolerance():
    with pytest.raises(ValueError, match="tolerance"):
        metrics.surface_dice(np.zeros(1), np.zeros(1), -1.0)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        metrics.confusion(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


# ------------------------------------------------------------------------- independent references

RNG = np.random.default_rng(7)
MASK_PAIRS = {
    "offset-ellipsoids": (ellipsoid((18, 20, 30), (10, 12, 15)), ellipsoid((20, 21, 33), (9, 13, 14))),
    "far-ellipsoids": (ellipsoid((18, 20, 30), (10, 12, 15)), ellipsoid((28, 30, 25), (6, 8, 10))),
    "nested": (ellipsoid((19, 22, 30), (12, 14, 18)), ellipsoid((19, 22, 30), (7, 9, 10))),
    "at-border": (ellipsoid((0, 0, 0), (10, 12, 15)), ellipsoid((2, 1, 3), (11, 10, 16))),
    "random": (RNG.random(SHAPE) < 0.3, RNG.random(SHAPE) < 0.3),
}


def sitk_mask(mask: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(mask.astype(np.uint8).transpose(2, 1, 0))
    image.SetSpacing(SPACING)
    return image


@pytest.mark.parametrize("name", MASK_PAIRS)
def test_dice_and_jaccard_match_simpleitk(name):
    ref, pred = MASK_PAIRS[name]
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(sitk_mask(ref), sitk_mask(pred))
    tp, fp, fn, _ = metrics.confusion(ref, pred)
    assert metrics.dice(tp, fp, fn) == pytest.approx(overlap.GetDiceCoefficient(), abs=1e-9)
    assert metrics.jaccard(tp, fp, fn) == pytest.approx(overlap.GetJaccardCoefficient(), abs=1e-9)


@pytest.mark.parametrize("name", MASK_PAIRS)
def test_hausdorff_matches_simpleitk_on_masks_without_holes(name):
    # SimpleITK measures voxel to voxel, medseg surface to surface: equal when the maximum lies
    # outside the other mask, which holds for solid shapes (and for these random masks).
    ref, pred = MASK_PAIRS[name]
    hausdorff = sitk.HausdorffDistanceImageFilter()
    hausdorff.Execute(sitk_mask(ref), sitk_mask(pred))
    ours = metrics.hausdorff(*metrics.surface_distances(ref, pred, SPACING))
    assert ours == pytest.approx(hausdorff.GetHausdorffDistance(), abs=1e-9)


def test_hausdorff_differs_from_simpleitk_for_a_hole():
    # A one-voxel hole deep inside the prediction: its surface is 8.8 mm from the reference surface,
    # while SimpleITK counts voxels of the prediction inside the reference as 0 mm away.
    ref = ellipsoid((18, 20, 30), (10, 12, 15))
    pred = ref.copy()
    pred[22, 18, 12] = False
    hausdorff = sitk.HausdorffDistanceImageFilter()
    hausdorff.Execute(sitk_mask(ref), sitk_mask(pred))
    assert hausdorff.GetHausdorffDistance() == pytest.approx(0.8)  # the hole is one x step from the prediction
    assert metrics.hausdorff(*metrics.surface_distances(ref, pred, SPACING)) == pytest.approx(8.8)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecated internal argument
@pytest.mark.parametrize("name", MASK_PAIRS)
def test_surface_metrics_match_monai(name):
    torch = pytest.importorskip("torch")
    from monai.metrics import (
        compute_average_surface_distance,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    ref, pred = MASK_PAIRS[name]
    one_hot = lambda m: torch.from_numpy(np.stack([~m, m])[None].astype(np.float32))  # noqa: E731  (B, C, X, Y, Z)
    y, y_pred = one_hot(ref), one_hot(pred)
    monai = {
        "hd95_mm": compute_hausdorff_distance(y_pred, y, percentile=95, spacing=SPACING).item(),
        "hd_mm": compute_hausdorff_distance(y_pred, y, spacing=SPACING).item(),
        "assd_mm": compute_average_surface_distance(y_pred, y, symmetric=True, spacing=SPACING).item(),
        "surface_dice": compute_surface_dice(y_pred, y, class_thresholds=[2.0], spacing=SPACING).item(),
    }
    ours = metrics.distance_metrics(*metrics.surface_distances(ref, pred, SPACING), tolerance_mm=2.0)
    # Same surfaces, same exact Euclidean distances, same percentile: only MONAI's float32 differs.
    for key, value in monai.items():
        assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key


def test_monai_gives_nan_hd95_where_medseg_gives_inf():
    torch = pytest.importorskip("torch")
    from monai.metrics import compute_hausdorff_distance

    ref, empty = MASK_PAIRS["nested"][0], np.zeros(SHAPE, bool)
    one_hot = lambda m: torch.from_numpy(np.stack([~m, m])[None].astype(np.float32))  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monai = compute_hausdorff_distance(one_hot(empty), one_hot(ref), percentile=95, spacing=SPACING).item()
    assert math.isnan(monai)
    assert metrics.hausdorff(*metrics.surface_distances(ref, empty, SPACING), percentile=95) == INF


def test_cropping_changes_no_distance():
    ref, pred = MASK_PAIRS["offset-ellipsoids"]
    padded = [np.pad(m, ((5, 9), (0, 3), (7, 2))) for m in (ref, pred)]
    for a, b in zip(metrics.surface_distances(ref, pred, SPACING), metrics.surface_distances(*padded, SPACING)):
        np.testing.assert_allclose(np.sort(a), np.sort(b), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------ evaluate_case

ORGANS = {1: "prostate", 2: "bladder", 3: "rectum"}


# ---------------------------------------------------------------------------------- pixel accuracy


def test_pixel_accuracy_hand_worked():
    # 8 voxels: reference 0 0 0 0 1 1 2 2, prediction 0 0 1 1 1 1 2 0.
    ref = np.array([0, 0, 0, 0, 1, 1, 2, 2], np.uint8).reshape(2, 2, 2)
    pred = np.array([0, 0, 1, 1, 1, 1, 2, 0], np.uint8).reshape(2, 2, 2)
    accuracy, mean_accuracy = metrics.pixel_accuracy(ref, pred, classes=[1, 2])
    assert accuracy == pytest.approx(5 / 8)
    assert mean_accuracy == pytest.approx((2 / 4 + 2 / 2 + 1 / 2) / 3)
    # A value outside the organs counts as background; an ignored organ's voxels are left out.
    assert metrics.pixel_accuracy(ref, pred, classes=[1]) == pytest.approx((6 / 8, (4 / 6 + 2 / 2) / 2))
    assert metrics.pixel_accuracy(ref, pred, classes=[1], ignore=[2]) == pytest.approx((4 / 6, (2 / 4 + 2 / 2) / 2))


def test_pixel_accuracy_of_empty_maps_is_one():
    empty = np.zeros((3, 3, 3), np.uint8)
    assert metrics.pixel_accuracy(empty, empty, classes=[1]) == (1.0, 1.0)




# ------------------------------------------------------------------------------ 2D images: (X, Y, 1)


def test_2d_surfaces_are_in_plane_contours():
    """Two 10x10-pixel squares, the second shifted 2 pixels along X, as medseg holds 2D images: (X, Y, 1).

    A-only column x=5 is 2 px (1.0 mm) from B's contour; worked by hand over A's 36 contour pixels:
    10 at 1.0 mm (left column), 2 at 0.5 (x=6 on the top/bottom rows), 16 at 0 (on B's rows), and the
    right column x=14, y=6..13: 0.7 at y=6 and 13 (B's rows are 1 px = 0.7 mm away), 1.0 elsewhere.
    Were the singleton axis a 3D slab, every pixel would be surface and ASSD would fall to 0.15 mm.
    """
    spacing = (0.5, 0.7, 1.0)
    ref, pred = np.zeros((24, 20, 1), bool), np.zeros((24, 20, 1), bool)
    ref[5:15, 5:15], pred[7:17, 5:15] = True, True
    assert metrics.surface(ref).sum() == 36  # the contour, not all 100 pixels
    values = all_metrics(ref, pred, spacing, tolerance_mm=0.6)
    assert values["hd95_mm"] == pytest.approx(2 * spacing[0])
    assert values["hd_mm"] == pytest.approx(2 * spacing[0])
    per_direction = 10 * 1.0 + 2 * 0.5 + 6 * 1.0 + 2 * 0.7
    assert values["assd_mm"] == pytest.approx(2 * per_direction / 72)
    assert values["surface_dice"] == pytest.approx(36 / 72)  # the 0 and 0.5 mm pixels of both contours
    assert values["dice"] == pytest.approx(2 * 80 / 200)
