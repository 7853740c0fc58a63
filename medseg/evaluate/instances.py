"""Instance metrics: how well separate objects (nuclei, lesions) were found and outlined, one by one.

Pure functions on two instance maps of one grid (0 background, one id per object, ids need not be
consecutive). Everything is built on one table, the overlap of every reference object with every
predicted one, as the semantic metrics are built on confusion counts.

- Matching: a reference and a predicted object match when their IoU is above 0.5. Above 0.5 (not at or
  above) each object can match at most one other, so the matching is unique without an assignment
  step (Kirillov et al. 2019, panoptic segmentation, Theorem 1); at exactly 0.5 two predictions can
  share one reference. Higher thresholds (the 0.5:0.95 sweeps of the Data Science Bowl 2018) work alike.
- Detection: true positives are matches, false positives unmatched predictions, false negatives unmatched
  references; precision, recall and F1 = 2TP / (2TP + FP + FN).
- Panoptic quality PQ = SQ x RQ: SQ the mean IoU of the matches, RQ the F1 above (Kirillov et al. 2019).
- Aggregated Jaccard index, AJI (Kumar et al. 2017, IEEE TMI): each reference object is paired with the
  prediction of highest IoU among those it overlaps (a prediction may be chosen by several references,
  as in the original); AJI = sum of the pairs' intersections / (sum of their unions + the areas of
  references that overlap nothing + the areas of predictions never chosen). It penalises both splits
  and merges pixel by pixel, where F1 counts objects.

Empty cases, decided as the literature does: with no object in either map every score is NaN (nothing
to find and nothing found; the PQ reference implementation leaves such a class out of its average, and
medseg's Dice is NaN there too), so means skip it. With objects in one map only: F1, PQ and AJI are 0,
precision is 0 with predictions and no reference, recall 0 with references and no prediction, and the
other of the two NaN (0/0); SQ is NaN whenever nothing matched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

METRICS = ("f1", "precision", "recall", "pq", "sq", "rq", "aji")  # the scores of `instance_scores`


@dataclass(frozen=True)
class Overlaps:
    """Every pair of overlapping objects, and every object's size (voxels)."""

    ref_sizes: dict[int, int]
    pred_sizes: dict[int, int]
    pairs: np.ndarray  # (n, 3) int64 rows: reference id, predicted id, shared voxels

    def iou(self) -> np.ndarray:
        """IoU of each row of `pairs`."""
        ref = np.array([self.ref_sizes[int(r)] for r in self.pairs[:, 0]], float)
        pred = np.array([self.pred_sizes[int(p)] for p in self.pairs[:, 1]], float)
        shared = self.pairs[:, 2].astype(float)
        return shared / (ref + pred - shared)


@dataclass(frozen=True)
class Matching:
    pairs: list[tuple[int, int, float]]  # (reference id, predicted id, IoU) of each match
    missed: list[int]  # reference ids without a match (false negatives)
    spurious: list[int]  # predicted ids without a match (false positives)


def overlaps(reference: np.ndarray, prediction: np.ndarray) -> Overlaps:
    """The overlap table of two instance maps of the same shape."""
    reference, prediction = np.asarray(reference), np.asarray(prediction)
    if reference.shape != prediction.shape:
        raise ValueError(f"instance maps differ in shape: {reference.shape} vs {prediction.shape}")
    sizes = []
    for ids in (reference, prediction):
        if ids.size and ids.min() < 0:
            raise ValueError("instance ids must be 0 (background) or positive")
        counts = np.bincount(ids.ravel().astype(np.int64))
        sizes.append({int(i): int(counts[i]) for i in np.flatnonzero(counts) if i > 0})
    both = (reference > 0) & (prediction > 0)
    ref, pred = reference[both].astype(np.int64), prediction[both].astype(np.int64)
    scale = int(pred.max()) + 1 if pred.size else 1
    keys, shared = np.unique(ref * scale + pred, return_counts=True)
    pairs = np.stack([keys // scale, keys % scale, shared], 1) if keys.size else np.zeros((0, 3), np.int64)
    return Overlaps(sizes[0], sizes[1], pairs)


def match_instances(reference: np.ndarray, prediction: np.ndarray, threshold: float = 0.5,
                    table: Overlaps | None = None) -> Matching:
    """Pairs of objects whose IoU is above `threshold` (>= 0.5, so each object matches at most once)."""
    if not 0.5 <= threshold < 1:
        raise ValueError(f"IoU threshold must be in [0.5, 1) for a unique matching, got {threshold}")
    table = table or overlaps(reference, prediction)
    iou = table.iou()
    keep = iou > threshold
    pairs = [(int(r), int(p), float(v)) for (r, p, _), v in zip(table.pairs[keep], iou[keep])]
    matched_ref, matched_pred = {r for r, _, _ in pairs}, {p for _, p, _ in pairs}
    return Matching(pairs, sorted(set(table.ref_sizes) - matched_ref), sorted(set(table.pred_sizes) - matched_pred))


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def detection_scores(matching: Matching) -> dict[str, float]:
    """tp, fp, fn, precision, recall, F1, and panoptic quality with its SQ and RQ parts."""
    return _from_counts(len(matching.pairs), len(matching.spurious), len(matching.missed),
                        sum(v for _, _, v in matching.pairs))


def _from_counts(tp: int, fp: int, fn: int, iou_sum: float) -> dict[str, float]:
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {"tp": tp, "fp": fp, "fn": fn, "iou_sum": iou_sum, "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, tp + fn), "f1": f1, "rq": f1, "sq": _ratio(iou_sum, tp),
            "pq": _ratio(iou_sum, tp + 0.5 * fp + 0.5 * fn)}


def aggregated_jaccard(table: Overlaps) -> tuple[int, int]:
    """AJI's intersection and union sums (Kumar et al. 2017); AJI is their ratio."""
    iou = table.iou()
    shared = union = 0
    chosen: set[int] = set()
    paired: set[int] = set()
    order = np.lexsort((table.pairs[:, 1], -iou, table.pairs[:, 0]))  # per reference: best IoU, then lowest id
    for row in order:
        ref, pred, both = (int(v) for v in table.pairs[row])
        if ref in paired:
            continue
        paired.add(ref)
        chosen.add(pred)
        shared += both
        union += table.ref_sizes[ref] + table.pred_sizes[pred] - both
    union += sum(size for ref, size in table.ref_sizes.items() if ref not in paired)
    union += sum(size for pred, size in table.pred_sizes.items() if pred not in chosen)
    return shared, union


def instance_scores(reference: np.ndarray, prediction: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Every instance score of one case: `METRICS`, plus the counts they come from (tp, fp, fn,
    iou_sum, aji_shared, aji_union, n_reference, n_predicted) so that cases can be pooled."""
    table = overlaps(reference, prediction)
    scores = detection_scores(match_instances(reference, prediction, threshold, table))
    shared, union = aggregated_jaccard(table)
    scores.update(aji=_ratio(shared, union), aji_shared=shared, aji_union=union,
                  n_reference=len(table.ref_sizes), n_predicted=len(table.pred_sizes))
    return scores


def pooled_scores(cases: Sequence[dict[str, float]]) -> dict[str, float]:
    """Scores of a dataset counted as one pool of objects (PQ's own convention): tp, fp, fn, matched IoU
    and AJI's intersections and unions summed over the cases, then the ratios."""
    total = {key: sum(case[key] for case in cases) for key in ("tp", "fp", "fn", "iou_sum", "aji_shared", "aji_union")}
    pooled = _from_counts(total["tp"], total["fp"], total["fn"], total["iou_sum"])
    pooled.update(aji=_ratio(total["aji_shared"], total["aji_union"]), aji_shared=total["aji_shared"],
                  aji_union=total["aji_union"])
    return pooled
