"""medseg.evaluate.cases: a pair of label maps becomes rows, with the empty-mask conventions and partial labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_metrics import (
    INF,
    MASK_PAIRS,
    ORGANS,
    SHAPE,
    SPACING,
    all_metrics,
    assert_values,
    ellipsoid,
)

from medseg.config import CASE_ORGAN
from medseg.evaluate.cases import FALLBACK_SOURCE, evaluate_case, surface_tolerances, task_tolerances
from medseg.evaluate.report import summarize


def label_maps() -> tuple[np.ndarray, np.ndarray]:
    ref = np.zeros(SHAPE, np.uint8)
    pred = np.zeros(SHAPE, np.uint8)
    ref[MASK_PAIRS["offset-ellipsoids"][0]] = 1
    pred[MASK_PAIRS["offset-ellipsoids"][1]] = 1
    ref[ellipsoid((8, 8, 8), (5, 5, 6))] = 2  # bladder missed by the prediction
    return ref, pred  # rectum absent from both


def by_key(rows) -> dict[tuple[str, str], float]:
    return {(r["organ"], r["metric"]): r["value"] for r in rows}


def test_evaluate_case_rows_equal_the_metrics_on_full_masks():
    ref, pred = label_maps()
    rows = evaluate_case(ref, pred, SPACING, ORGANS, case="c1")
    assert {tuple(r) for r in rows} == {("case", "organ", "metric", "value")}
    assert {r["case"] for r in rows} == {"c1"}
    values = by_key(rows)
    for label, organ in ORGANS.items():
        expected = all_metrics(ref == label, pred == label, SPACING)
        assert_values({m: values[organ, m] for m in expected}, expected, tol=1e-9)


def test_evaluate_case_empty_conventions_and_summary():
    ref, pred = label_maps()
    values = by_key(evaluate_case(ref, pred, SPACING, ORGANS))
    assert math.isnan(values["rectum", "dice"]) and math.isnan(values["rectum", "hd95_mm"])
    assert values["bladder", "dice"] == 0 and values["bladder", "surface_dice"] == 0
    assert values["bladder", "hd95_mm"] == values["bladder", "assd_mm"] == INF

    rows = evaluate_case(ref, pred, SPACING, ORGANS, case="a") + evaluate_case(ref, ref, SPACING, ORGANS, case="b")
    summary = summarize(rows)
    assert set(summary) == {"prostate", "bladder", "rectum", CASE_ORGAN}
    assert summary["rectum"]["dice"] == dict(mean=None, std=None, median=None, n=0, n_empty=2, n_inf=0)
    assert summary["rectum"]["volume_ref_ml"]["n"] == 0  # empty pairs leave every metric's mean
    bladder = summary["bladder"]
    assert bladder["dice"]["n"] == 2 and bladder["dice"]["mean"] == pytest.approx(0.5)
    assert bladder["hd95_mm"] == dict(mean=0.0, std=None, median=0.0, n=1, n_empty=0, n_inf=1)


def test_organs_not_contoured_are_left_out():
    ref, pred = label_maps()
    pred[ellipsoid((8, 8, 8), (5, 5, 6))] = 2
    rows = evaluate_case(ref, pred, SPACING, ORGANS, not_contoured={"bladder"})
    assert "bladder" not in {r["organ"] for r in rows}
    full = by_key(evaluate_case(ref, pred, SPACING, {1: "prostate"}))
    # bladder voxels are ignored, not counted as agreeing background
    assert by_key(rows)[CASE_ORGAN, "pixel_accuracy"] < full[CASE_ORGAN, "pixel_accuracy"]


def test_unnamed_organs_come_from_the_values_present():
    ref, pred = label_maps()
    organs = {r["organ"] for r in evaluate_case(ref, pred, SPACING, None)}
    assert organs == {"label_1", "label_2", CASE_ORGAN}


def test_tolerance_per_organ():
    ref, pred = label_maps()
    tight = by_key(evaluate_case(ref, pred, SPACING, ORGANS, tolerance_mm={"prostate": 0.5}))
    loose = by_key(evaluate_case(ref, pred, SPACING, ORGANS, tolerance_mm=10.0))
    assert tight["prostate", "surface_dice"] < loose["prostate", "surface_dice"] == 1.0
    with pytest.raises(ValueError, match="unknown organs"):
        evaluate_case(ref, pred, SPACING, ORGANS, tolerance_mm={"liver": 1.0})


def test_surface_tolerances_come_from_the_argument_then_the_task_file_then_the_fallback():
    from medseg.config import load_task

    from_task = task_tolerances(load_task("headneck").labels)
    assert from_task == {"brainstem": 2.5, "spinal_cord": 2.93, "right_parotid": 2.85, "left_parotid": 2.85,
                         "mandible": 1.01}
    table = surface_tolerances(["brainstem", "larynx"], from_task)
    assert table == {"brainstem": (2.5, "task file"), "larynx": (2.0, FALLBACK_SOURCE)}
    assert FALLBACK_SOURCE == "fallback 2 mm"
    assert surface_tolerances(["brainstem", "larynx"], from_task, {"larynx": 4.0}) == {
        "brainstem": (2.5, "task file"), "larynx": (4.0, "given")}
    assert surface_tolerances(["brainstem"], from_task, 3.0) == {"brainstem": (3.0, "given")}



def test_2d_maps_report_areas_in_mm2_and_3d_keeps_volumes():
    """A 2D image ((X, Y, 1)) has areas instead of volumes; a 3D organ drawn on one slice is still 3D."""
    ref, pred = np.zeros((20, 16, 1), np.uint8), np.zeros((20, 16, 1), np.uint8)
    ref[2:8, 3:9], pred[4:8, 3:9] = 1, 1  # 36 and 24 pixels
    rows = {r["metric"]: r["value"] for r in evaluate_case(ref, pred, (0.5, 0.25, 1.0), {1: "nucleus", 2: "cell"})
            if r["organ"] == "nucleus"}
    assert rows["area_ref_mm2"] == pytest.approx(36 * 0.125) and rows["area_pred_mm2"] == pytest.approx(24 * 0.125)
    assert "volume_ref_ml" not in rows
    assert rows["hd_mm"] == pytest.approx(2 * 0.5)  # in-plane: the contour rows 2 px apart along X
    volume = np.zeros((20, 16, 5), np.uint8)
    volume[..., 2:3] = ref  # the same square on one slice of a 3D scan: the old 3D surface, volumes in mL
    pred3 = np.zeros_like(volume)
    pred3[..., 2:3] = pred
    rows3 = {r["metric"]: r["value"] for r in evaluate_case(volume, pred3, (0.5, 0.25, 1.0), {1: "nucleus"})
             if r["organ"] == "nucleus"}
    assert rows3["volume_ref_ml"] == pytest.approx(36 * 0.125 / 1000)
    assert rows3["assd_mm"] < rows["assd_mm"]  # every voxel of a one-slice 3D organ is surface
