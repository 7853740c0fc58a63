"""Instance metrics on tiny hand-made maps whose scores are worked out by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.evaluate.instances import (
    METRICS,
    aggregated_jaccard,
    instance_scores,
    match_instances,
    overlaps,
    pooled_scores,
)


def _maps(shape=(6, 10)):
    return np.zeros(shape, np.uint16), np.zeros(shape, np.uint16)


def test_one_perfect_match_and_one_missed_object():
    ref, pred = _maps()
    ref[0:2, 0:2] = 3  # found exactly
    ref[4:6, 6:8] = 9  # missed
    pred[0:2, 0:2] = 5
    s = instance_scores(ref, pred)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 1)
    assert s["precision"] == 1 and s["recall"] == 0.5 and s["f1"] == pytest.approx(2 / 3)
    assert s["sq"] == 1 and s["rq"] == pytest.approx(2 / 3)
    assert s["pq"] == pytest.approx(1 / (1 + 0.5 * 0 + 0.5 * 1))  # sum IoU / (TP + FP/2 + FN/2)
    assert s["aji"] == pytest.approx(4 / (4 + 4))  # the missed object's 4 pixels join the union
    assert (s["n_reference"], s["n_predicted"]) == (2, 1)


def test_a_partial_match_and_a_spurious_object():
    ref, pred = _maps()
    ref[0:2, 0:4] = 1  # 8 pixels
    pred[0:2, 1:4] = 1  # 6 of them: IoU 6/8
    pred[4:6, 8:9] = 2  # 2 pixels where nothing is
    s = instance_scores(ref, pred)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 0)
    assert s["precision"] == 0.5 and s["recall"] == 1 and s["f1"] == pytest.approx(2 / 3)
    assert s["sq"] == pytest.approx(0.75)
    assert s["pq"] == pytest.approx(0.75 / (1 + 0.5))  # = SQ x RQ = 0.75 x 2/3
    assert s["pq"] == pytest.approx(s["sq"] * s["rq"])
    assert s["aji"] == pytest.approx(6 / (8 + 2))  # C = 6, U = 8 + the unchosen prediction's 2


def test_iou_of_exactly_one_half_is_no_match():
    ref, pred = _maps()
    ref[0:2, 0:3] = 1
    pred[0:2, 1:4] = 1  # 4 shared of 8 in the union: IoU 0.5, not above it
    matching = match_instances(ref, pred)
    assert matching.pairs == [] and matching.missed == [1] and matching.spurious == [1]
    s = instance_scores(ref, pred)
    assert s["f1"] == 0 and s["pq"] == 0 and math.isnan(s["sq"]) and s["aji"] == pytest.approx(0.5)


def test_two_objects_merged_into_one_prediction():
    """AJI lets one prediction be chosen by both references, and counts its pixels in both unions."""
    ref, pred = _maps()
    ref[0:2, 0:2], ref[0:2, 2:4] = 1, 2
    pred[0:2, 0:4] = 1  # IoU 0.5 with each: no match
    s = instance_scores(ref, pred)
    assert (s["tp"], s["fp"], s["fn"]) == (0, 1, 2) and s["f1"] == 0
    assert aggregated_jaccard(overlaps(ref, pred)) == (4 + 4, 8 + 8)
    assert s["aji"] == pytest.approx(0.5)


def test_split_object_and_ties_take_the_lowest_id():
    ref, pred = _maps()
    ref[0:2, 0:4] = 1
    pred[0:2, 0:2], pred[0:2, 2:4] = 7, 4  # equal halves: IoU 0.5 each; AJI chooses id 4
    table = overlaps(ref, pred)
    assert table.ref_sizes == {1: 8} and table.pred_sizes == {4: 4, 7: 4}
    assert table.pairs.tolist() == [[1, 4, 4], [1, 7, 4]]
    assert aggregated_jaccard(table) == (4, 8 + 4)  # pair (1, 4); prediction 7 unchosen


@pytest.mark.parametrize("ref_objects, pred_objects", [
    pytest.param(False, False, id="both-empty"),
    pytest.param(True, False, id="reference-only"),
    pytest.param(False, True, id="prediction-only"),
])
def test_empty_cases(ref_objects, pred_objects):
    ref, pred = _maps()
    ref[1:3, 1:3] = 1 if ref_objects else 0
    pred[1:3, 5:7] = 1 if pred_objects else 0
    s = instance_scores(ref, pred)
    if not ref_objects and not pred_objects:  # nothing to find, nothing found: undefined, left out of means
        assert all(math.isnan(s[m]) for m in METRICS)
        return
    assert s["f1"] == 0 and s["pq"] == 0 and s["aji"] == 0 and math.isnan(s["sq"])
    if ref_objects:
        assert s["recall"] == 0 and math.isnan(s["precision"])
    else:
        assert s["precision"] == 0 and math.isnan(s["recall"])


def test_pooled_scores_sum_the_counts():
    ref, pred = _maps()
    ref[0:2, 0:2], ref[4:6, 6:8] = 1, 2
    pred[0:2, 0:2] = 1
    first = instance_scores(ref, pred)  # TP 1, FN 1, AJI 4/8
    second = instance_scores(ref, ref)  # TP 2, AJI 8/8
    pooled = pooled_scores([first, second])
    assert (pooled["tp"], pooled["fp"], pooled["fn"]) == (3, 0, 1)
    assert pooled["f1"] == pytest.approx(6 / 7) and pooled["pq"] == pytest.approx(3 / 3.5)
    assert pooled["aji"] == pytest.approx(12 / 16)


def test_bad_inputs():
    ref, pred = _maps()
    with pytest.raises(ValueError, match="unique matching"):
        match_instances(ref, pred, threshold=0.3)
    with pytest.raises(ValueError, match="differ in shape"):
        overlaps(ref, pred[:3])
