"""Validation during training: full-volume sliding windows on held-out cases, the code `medseg predict` uses."""

from __future__ import annotations

import math

import numpy as np
import torch
import torchio as tio

from medseg.config import Task
from medseg.data.partial import CONTOURED
from medseg.distributed import World
from medseg.infer.stitching import sliding_window_logits
from medseg.model.networks import NetworkPlan


def dice_per_organ(reference: np.ndarray, predicted: np.ndarray, organs: dict[int, str]) -> dict[str, float]:
    """Dice per organ; NaN where the organ is absent from both (left out of means)."""
    from medseg.evaluate.metrics import confusion, dice

    scores = {}
    for label_id, name in organs.items():
        scores[name] = dice(*confusion(reference == label_id, predicted == label_id)[:3])
    return scores


def validate(network, subjects: list[tio.Subject], task: Task, plan: NetworkPlan, device: torch.device,
             world: World = World(), precision: str = "auto") -> dict[str, float]:
    """Full-volume sliding-window inference on held-out cases (model space), mean Dice per organ.

    `subjects` are this rank's share; the per-case scores of all ranks are gathered, so every rank
    returns the same means.
    """
    network.eval()
    per_case = []
    for subject in subjects:
        logits = sliding_window_logits(network, subject["image"].data, plan.patch_size, task.inference.overlap,
                                       task.inference.sw_batch_size, task.inference.blending, device, precision)
        predicted = logits.argmax(0).numpy().astype(np.uint8)
        scores = dice_per_organ(subject["label"].data[0].numpy(), predicted, task.label_names)
        if CONTOURED in subject:  # an organ the case did not contour has no reference to score against
            scores.update({name: float("nan") for i, name in task.label_names.items() if not subject[CONTOURED][i]})
        per_case.append(scores)
    per_case = [scores for share in world.gather(per_case) for scores in share]
    return {name: float(np.nanmean([c[name] for c in per_case])) if any(not math.isnan(c[name]) for c in per_case)
            else float("nan") for name in task.label_names.values()}
