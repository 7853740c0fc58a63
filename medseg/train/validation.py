"""Validation during training: held-out cases through `medseg predict`'s windows, Dice on the model grid.

A case is scored on the model grid it was preprocessed to (the cached subject), as before: Dice per
organ of the argmax labels against the resampled reference. The windows follow `medseg predict`: on a
CT they cover only the body's box (`inference.crop_to_body`, the same `geometry.body_box`, its -500 HU
threshold carried through the normalisation) and the grid outside it is background, as predict writes
it. On the head-and-neck CTs (UNet 16-256, 64x64x80 windows, bf16, one thread of a shared AVX512-BF16
CPU) hn_001 went from 27 windows and 1.60 s to 2 windows and 0.14 s; twelve cases from 453 windows
and 34.4 s to 170 windows and 13.3 s (docs/performance.md).

The windows go through the network itself, or through OpenVINO where `medseg.infer.backends` would
pick it and where it pays: the weights change between validations, so each validation converts them
again (3.3-4.7 s for that UNet, against ~0.02 s saved a window), and that only pays where the
validation saves more than that (`openvino_pays`; it did not for those twelve cases). `measure_validation` times one case both ways once, at the start of a
budgeted run, and the budget plans with what it measured (`medseg.train.budget`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchio as tio

from medseg.config import Task
from medseg.data.partial import CONTOURED
from medseg.data.preprocess import Preprocessing
from medseg.distributed import World
from medseg.geometry import BODY_HU, Box, body_box
from medseg.infer.stitching import sliding_window_logits, window_starts
from medseg.model.networks import NetworkPlan


def dice_per_organ(reference: np.ndarray, predicted: np.ndarray, organs: dict[int, str]) -> dict[str, float]:
    """Dice per organ; NaN where the organ is absent from both (left out of means)."""
    from medseg.evaluate.metrics import confusion, dice

    scores = {}
    for label_id, name in organs.items():
        scores[name] = dice(*confusion(reference == label_id, predicted == label_id)[:3])
    return scores


# ------------------------------------------------------------------------------- where the windows go


def body_threshold(prep: Preprocessing) -> float | None:
    """`BODY_HU` in the units of a preprocessed volume (clip, then dataset mean and std), for `body_box`.

    None where the normalisation hides it: a per-image z-score, or a clip window that does not hold it
    (every voxel below the window's floor looks the same).
    """
    stats = prep.channels[0]
    if prep.normalize == "image" or (stats.clip is not None and not stats.clip[0] < BODY_HU < stats.clip[1]):
        return None
    return (BODY_HU - stats.mean) / stats.std


def validation_box(image: torch.Tensor, task: Task, plan: NetworkPlan, prep: Preprocessing | None) -> Box:
    """Where the windows go on a preprocessed (C, X, Y, Z) volume: the body's box on a CT, as `medseg
    predict` crops it (`Predictor.body_box`); the whole grid elsewhere or without `prep`."""
    threshold = body_threshold(prep) if prep is not None else None
    if task.modality != "CT" or not task.inference.crop_to_body or threshold is None:
        return tuple(slice(0, n) for n in image.shape[1:])
    return body_box(image[0], plan.patch_size, threshold=threshold)


def window_count(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """How many windows `sliding_window_logits` runs over a volume of `shape` (a short axis is padded)."""
    return math.prod(len(window_starts(max(n, r), r, overlap)) for n, r in zip(shape, roi))


def validation_windows(subjects: list[tio.Subject], task: Task, plan: NetworkPlan, prep: Preprocessing | None) -> int:
    """Windows one validation of `subjects` runs: what its time grows with."""
    return sum(window_count([b.stop - b.start for b in validation_box(s["image"].data, task, plan, prep)],
                            plan.patch_size, task.inference.overlap) for s in subjects)


# ------------------------------------------------------------------------------------ one validation


def window_network(network: torch.nn.Module, plan: NetworkPlan, precision: str, backend: str = "torch"):
    """What the windows go through: the network, or (backend 'openvino') its current weights compiled.

    OpenVINO converts a fresh network of the plan holding the current weights (the averaged ones
    inside `WeightAverage.applied`) in eval mode (the main output; no deep-supervision heads): fresh,
    because the training network runs its instance norms as group norms (`prepare_network`), and
    OpenVINO ran the group-norm graph 1.2x slower than the instance norms it fuses.
    """
    if backend != "openvino":
        return network
    from medseg.infer.backends import openvino_in_memory
    from medseg.model.networks import build_network

    fresh = build_network(plan)
    fresh.load_state_dict(network.state_dict())
    return openvino_in_memory(fresh.eval(), (plan.in_channels, *plan.patch_size), precision)


def case_labels(windows, image: torch.Tensor, box: Box, task: Task, plan: NetworkPlan, device: torch.device,
                precision: str) -> np.ndarray:
    """(C, X, Y, Z) preprocessed -> (X, Y, Z) uint8 argmax labels; background outside `box`."""
    inference = task.inference
    logits = sliding_window_logits(windows, image[(slice(None), *box)], plan.patch_size, inference.overlap,
                                   inference.sw_batch_size, inference.blending, device, precision)
    labels = np.zeros(tuple(image.shape[1:]), np.uint8)
    labels[box] = logits.argmax(0).numpy()
    return labels


def validate(network, subjects: list[tio.Subject], task: Task, plan: NetworkPlan, device: torch.device,
             world: World | None = None, precision: str = "auto", prep: Preprocessing | None = None,
             backend: str = "torch") -> dict[str, float]:
    """Sliding-window inference on held-out cases (model grid), mean Dice per organ.

    `subjects` are this rank's share; the per-case scores of all ranks are gathered, so every rank
    returns the same means.

    Args:
        prep: the run's preprocessing: with it, windows cover only the body on a CT (`validation_box`).
        backend: 'torch' or 'openvino' (`measure_validation` chooses): the network's current weights are converted
            for this validation alone.
    """
    world = world or World()
    network.eval()
    windows = window_network(network, plan, precision, backend) if subjects else network
    per_case = []
    for subject in subjects:
        image = subject["image"].data
        predicted = case_labels(windows, image, validation_box(image, task, plan, prep), task, plan, device, precision)
        scores = dice_per_organ(subject["label"].data[0].numpy(), predicted, task.label_names)
        if CONTOURED in subject:  # an organ the case did not contour has no reference to score against
            scores.update({name: float("nan") for i, name in task.label_names.items() if not subject[CONTOURED][i]})
        per_case.append(scores)
    per_case = [scores for share in world.gather(per_case) for scores in share]
    return {name: float(np.nanmean([c[name] for c in per_case])) if any(not math.isnan(c[name]) for c in per_case)
            else float("nan") for name in task.label_names.values()}


# ---------------------------------------------------------------------------- what a validation costs


def openvino_pays(torch_seconds: float, openvino_seconds: float, convert_seconds: float, repeats: float) -> bool:
    """Whether `repeats` times some work (one validation's windows, over those timed) is faster through
    OpenVINO, its conversion and compilation counted: they are paid once per validation."""
    return repeats * openvino_seconds + convert_seconds < repeats * torch_seconds


@dataclass(frozen=True)
class ValidationCost:
    """One case timed through each backend; what a whole validation costs with the one chosen."""

    backend: str  # 'torch' or 'openvino': what validations use
    seconds: float  # one whole validation, estimated (conversion included), the slowest rank's
    case_seconds: dict[str, float]  # backend -> seconds of the timed case (its windows)
    convert_seconds: float  # OpenVINO conversion + compilation; 0 where it was not tried
    repeats: float  # the validation's windows over the timed case's

    def to_dict(self) -> dict:
        return {"backend": self.backend, "seconds": round(self.seconds, 2), "convert_seconds": round(self.convert_seconds, 2),
                "case_seconds": {k: round(v, 3) for k, v in self.case_seconds.items()}, "repeats": round(self.repeats, 2)}


def measure_validation(network, subjects: list[tio.Subject], task: Task, plan: NetworkPlan, device: torch.device,
                       world: World | None = None, precision: str = "auto", prep: Preprocessing | None = None,
                       backend: str = "auto") -> ValidationCost:
    """Time this rank's first case through torch and (where `backend` resolves to it) OpenVINO, convert
    included, then choose the backend for the validations of `subjects` (`openvino_pays`).

    Every figure is the slowest rank's, so every rank takes the same choice.
    """
    from medseg.infer.backends import resolve_backend

    world = world or World()
    network.eval()
    tried = resolve_backend(backend, device)
    timed = subjects[:1]
    case_seconds, convert_seconds = {"torch": _time_case(network, timed, task, plan, device, precision, prep)}, 0.0
    if tried == "openvino":
        start = time.perf_counter()
        windows = window_network(network, plan, precision, "openvino") if timed else None
        convert_seconds = time.perf_counter() - start
        case_seconds["openvino"] = _time_case(windows, timed, task, plan, device, precision, prep)
    case_seconds = {name: world.max(seconds) for name, seconds in case_seconds.items()}
    convert_seconds = world.max(convert_seconds)
    repeats = world.max(validation_windows(subjects, task, plan, prep) / max(validation_windows(timed, task, plan, prep), 1))
    chosen = "torch"
    if tried == "openvino" and openvino_pays(case_seconds["torch"], case_seconds["openvino"], convert_seconds, repeats):
        chosen = "openvino"
    seconds = repeats * case_seconds[chosen] + (convert_seconds if chosen == "openvino" else 0.0)
    return ValidationCost(chosen, seconds, case_seconds, convert_seconds, repeats)


def _time_case(windows, timed: list[tio.Subject], task: Task, plan: NetworkPlan, device: torch.device, precision: str,
               prep: Preprocessing | None) -> float:
    """Seconds to label and score `timed` (one case, or none: 0)."""
    start = time.perf_counter()
    for subject in timed:
        image = subject["image"].data
        predicted = case_labels(windows, image, validation_box(image, task, plan, prep), task, plan, device, precision)
        dice_per_organ(subject["label"].data[0].numpy(), predicted, task.label_names)
    return time.perf_counter() - start
