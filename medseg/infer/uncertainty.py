"""How sure a prediction is: per-voxel maps and a per-organ confidence, from averaged class probabilities.

An ensemble's members are the folds of a cross-validation folder times the test-time flips (one
member for a single model without flips). Their softmax probabilities are summed as they come
(`Accumulator`), never held side by side, and from the mean p̄ (C classes):

- **uncertainty** = H(p̄) / log C, the normalised predictive entropy: 0 where one class has all the
  probability, 1 where every class is equally likely. Written as `<case>_uncertainty.nii.gz`.
- **disagreement** = (H(p̄) − mean over members of H(p_m)) / log C, the mutual information between the
  prediction and the member (BALD's "epistemic" part): 0 where the members agree, whatever their own
  doubt. Only with two or more members; written as `<case>_disagreement.nii.gz`.
- **confidence** of an organ = the mean of p̄ of that organ over the model-grid voxels where it wins
  the argmax (CONFIDENCE_SCORE). `organ_confidence` also gives 1 − mean normalised entropy there
  (`one_minus_entropy`); the cross-validation summary reports how each ranks against Dice
  (Spearman ρ over the out-of-fold organ-cases), so the choice can be checked on any task. With two or
  more members it is the members' mean of their own scores, each where that member predicts the organ
  (0 for a member that predicts it nowhere; p̄'s score if none does): averaged probabilities are flatter than any member's (the
  max of a mean is at most the mean of the maxes), so p̄'s score sat ~0.04 below what single models
  score, and a cross-validation folder's thresholds, chosen on single folds' out-of-fold predictions,
  flagged all 176 held-out organ-cases of the head-and-neck benchmark. On the members' scale they apply.

Maps are computed on the model grid (inside the windows' box; outside is background with certainty)
and carried to the scan's exact grid by linear interpolation, as float32.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from medseg.io import Grid

SCORES = ("mean_probability", "one_minus_entropy", "expected_dice")  # `organ_confidence`'s scores
CONFIDENCE_SCORE = "mean_probability"  # which of them is an organ's confidence (the QA flag's thresholds)
ESTIMATE_SCORE = "expected_dice"  # which of them a calibration turns into an estimated Dice


def entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Per-voxel entropy in nats of (K, X, Y, Z) probabilities, one class at a time (no (K, ...) temporary)."""
    total = torch.zeros(probabilities.shape[1:], dtype=torch.float32)
    for channel in probabilities:
        total.sub_(torch.special.xlogy(channel, channel))
    return total


class Accumulator:
    """Running sums of the members' probabilities (and, on request, of their entropies)."""

    def __init__(self, with_entropy: bool, organs: dict[int, str] | None = None):
        self.with_entropy = with_entropy
        self.organs = organs  # given: each member's own organ confidence is kept (`confidence`)
        self.total: torch.Tensor | None = None  # (K, X, Y, Z) sum of probabilities
        self.entropy_total: torch.Tensor | None = None  # (X, Y, Z) sum of the members' entropies
        self.member_scores: list[dict] = []
        self.count = 0

    def add(self, probabilities: torch.Tensor) -> None:
        """Add one member's (K, X, Y, Z) softmax; the first one is kept as the sum itself (no copy)."""
        member = entropy(probabilities) if self.with_entropy else None
        if self.organs and self.count:  # two members or more: each one's own scores (a single model needs none)
            if self.count == 1:  # the first member's, while the sum still is its probabilities
                self.member_scores.append(self._scores(self.total, self.entropy_total))
            self.member_scores.append(self._scores(probabilities, member))
        if self.with_entropy:
            self.entropy_total = member if self.entropy_total is None else self.entropy_total.add_(member)
        self.total = probabilities if self.total is None else self.total.add_(probabilities)
        self.count += 1

    def _scores(self, probabilities: torch.Tensor, nats: torch.Tensor | None) -> dict[str, dict]:
        scale = math.log(max(probabilities.shape[0], 2))
        return organ_confidence(probabilities, self.organs, None if nats is None else nats / scale)

    def confidence(self, mean: torch.Tensor, uncertainty: torch.Tensor | None = None) -> dict[str, dict]:
        """Per organ predicted in `mean`: its confidence (module docstring), from the members' own scores."""
        scores = organ_confidence(mean, self.organs, uncertainty)
        if self.count < 2:
            return scores
        for organ, values in scores.items():
            for key, value in values.items():
                members = [s[organ][key] for s in self.member_scores]
                if value is not None and any(m is not None for m in members):  # else p̄'s own, or None
                    values[key] = round(sum(m or 0.0 for m in members) / len(members), 4)
        return scores

    def mean_(self) -> torch.Tensor:
        """The mean probabilities, made in place of the sum."""
        return self.total.div_(self.count) if self.count > 1 else self.total

    def maps(self, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(uncertainty, disagreement) on the accumulated voxels, each in [0, 1]; disagreement None for one member."""
        scale = math.log(max(mean.shape[0], 2))
        predictive = entropy(mean)
        disagreement = None
        if self.count > 1 and self.entropy_total is not None:
            disagreement = (predictive - self.entropy_total / self.count).clamp_(min=0).div_(scale)
        return predictive.div_(scale), disagreement


def organ_confidence(mean: torch.Tensor, organs: dict[int, str],
                     uncertainty: torch.Tensor | None = None) -> dict[str, dict[str, float | None]]:
    """Per organ, scores of how sure the prediction is where the organ wins the argmax of `mean`.

    Args:
        mean: (K, X, Y, Z) averaged probabilities on the model grid.
        uncertainty: (X, Y, Z) normalised predictive entropy, if computed (else it is computed here).
    Returns:
        organ -> {"mean_probability": mean p̄ of the organ there, "one_minus_entropy": 1 − mean
        normalised entropy there, "expected_dice": 2 Σ p̄·mask / (Σ p̄ + |mask|), the Dice the mask
        would score if the probabilities were the truth}; None for an organ that wins nowhere.
    """
    top, winner = mean.max(0)
    if uncertainty is None:
        uncertainty = entropy(mean).div_(math.log(max(mean.shape[0], 2)))
    winner = winner.flatten()
    counts = torch.bincount(winner, minlength=mean.shape[0]).double()
    sums = torch.bincount(winner, weights=top.flatten().double(), minlength=mean.shape[0])
    doubts = torch.bincount(winner, weights=uncertainty.flatten().double(), minlength=mean.shape[0])
    mass = mean.flatten(1).sum(1, dtype=torch.float64)  # (K,) each class's expected voxel count
    scores = {}
    for label_id, name in organs.items():
        n = float(counts[label_id]) if label_id < len(counts) else 0.0
        scores[name] = {"mean_probability": round(float(sums[label_id]) / n, 4) if n else None,
                        "one_minus_entropy": round(1.0 - float(doubts[label_id]) / n, 4) if n else None,
                        "expected_dice": round(2.0 * float(sums[label_id]) / (float(mass[label_id]) + n), 4) if n else None}
    return scores


def to_scan_grid(values: torch.Tensor, box: tuple[slice, ...], model: Grid, grid: Grid) -> np.ndarray:
    """A map computed on `box` of the model grid (0 elsewhere), linearly interpolated onto the scan's grid.

    Returns:
        (X, Y, Z) float32 on `grid`.
    """
    import SimpleITK as sitk

    from medseg.io import from_array, to_array

    full = np.zeros(model.shape, np.float32)
    full[box] = values.numpy()
    resampled = sitk.Resample(from_array(full, model), list(grid.shape), sitk.Transform(), sitk.sitkLinear,
                              grid.origin, grid.spacing, grid.direction, 0.0, sitk.sitkFloat32)
    return to_array(resampled)


def write_maps(uncertainty: np.ndarray | None, disagreement: np.ndarray | None, grid: Grid, out: Path,
               case: str) -> list[Path]:
    """`<case>_uncertainty.nii.gz` and, with several members, `<case>_disagreement.nii.gz` (float32)."""
    from medseg.io import write_image

    written = []
    for name, values in (("uncertainty", uncertainty), ("disagreement", disagreement)):
        if values is not None:
            written.append(write_image(values.astype(np.float32, copy=False), grid, out / f"{case}_{name}.nii.gz"))
    return written
