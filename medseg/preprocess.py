"""From a scan as read to what the network sees: canonical orientation, target spacing, intensities.

The same `Preprocessing` (stored in every model folder) runs in training, validation and `medseg
predict`, so a model never sees data prepared differently from what it was trained on. TorchIO does
the spatial work; intensities follow nnU-Net: CT is clipped (task window, or the dataset's foreground
0.5/99.5 percentiles) and normalised with the dataset's foreground mean and std; MR is z-scored per image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import torch
import torchio as tio

from medseg.config import Task
from medseg.io import Grid


@dataclass(frozen=True)
class ChannelIntensity:
    clip: tuple[float, float] | None  # values outside are clipped before normalising
    mean: float  # subtracted after clipping (dataset foreground mean; 0 for per-image z-score)
    std: float  # divisor (dataset foreground std; 1 for per-image z-score)


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to prepare a scan for the network; saved as JSON in the model folder."""

    spacing: tuple[float, float, float]  # mm, canonical RAS axes
    normalize: str  # dataset | image | none
    channels: tuple[ChannelIntensity, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        channels = tuple(ChannelIntensity(tuple(c["clip"]) if c["clip"] else None, c["mean"], c["std"])
                         for c in data["channels"])
        return cls(tuple(data["spacing"]), data["normalize"], channels)


def resolve_preprocessing(task: Task, fingerprint: dict) -> Preprocessing:
    """Fix spacing and intensity statistics from the task and the training set's fingerprint."""
    spacing = tuple(fingerprint["median_spacing"]) if task.spacing == "auto" else task.spacing
    channels = []
    for stats in fingerprint["foreground_intensity"]:
        if task.intensity.normalize == "dataset":
            clip = task.intensity.window or (stats["p00_5"], stats["p99_5"])
            channels.append(ChannelIntensity(tuple(float(v) for v in clip), float(stats["mean"]),
                                             float(max(stats["std"], 1e-6))))
        else:
            channels.append(ChannelIntensity(task.intensity.window if task.modality == "CT" else None, 0.0, 1.0))
    return Preprocessing(tuple(float(s) for s in spacing), task.intensity.normalize, tuple(channels))


def _normalize(tensor: torch.Tensor, channels: tuple[ChannelIntensity, ...]) -> torch.Tensor:
    """(C, X, Y, Z) clip and scale per channel, in float32."""
    out = tensor.to(torch.float32)
    for c, stats in enumerate(channels):
        if stats.clip is not None:
            out[c].clamp_(*stats.clip)
        out[c].sub_(stats.mean).div_(stats.std)
    return out


def transform(prep: Preprocessing) -> tio.Transform:
    """TorchIO pipeline: RAS, target spacing, intensities. Labels are resampled nearest-neighbour."""
    steps: list[tio.Transform] = [tio.ToCanonical(), tio.Resample(prep.spacing)]
    if prep.normalize == "image":
        if any(c.clip for c in prep.channels):
            steps.append(tio.Lambda(partial(_normalize, channels=prep.channels), types_to_apply=[tio.INTENSITY]))
        steps.append(tio.ZNormalization())
    elif prep.normalize == "dataset" or any(c.clip for c in prep.channels):
        steps.append(tio.Lambda(partial(_normalize, channels=prep.channels), types_to_apply=[tio.INTENSITY]))
    return tio.Compose(steps)


def to_subject(image: np.ndarray, grid: Grid, labels: np.ndarray | None = None, **extra) -> tio.Subject:
    """A TorchIO subject from medseg arrays: image (C, X, Y, Z), labels (X, Y, Z) on the same grid."""
    fields = {"image": tio.ScalarImage(tensor=torch.from_numpy(np.ascontiguousarray(image)), affine=grid.ras_affine)}
    if labels is not None:
        fields["label"] = tio.LabelMap(tensor=torch.from_numpy(np.ascontiguousarray(labels[None])),
                                       affine=grid.ras_affine)
    return tio.Subject(**fields, **extra)


def preprocess(prep: Preprocessing, image: np.ndarray, grid: Grid, labels: np.ndarray | None = None) -> tio.Subject:
    """Run the model's preprocessing; the result's affine maps model voxels to RAS world."""
    return transform(prep)(to_subject(image, grid, labels))


def pad_to(subject: tio.Subject, size: tuple[int, int, int]) -> tio.Subject:
    """Pad symmetrically so that every axis is at least `size` (patches must fit in the volume)."""
    shape = subject.spatial_shape
    missing = [max(0, s - n) for s, n in zip(size, shape)]
    if not any(missing):
        return subject
    padding = []
    for m in missing:
        padding += [m // 2, m - m // 2]
    return tio.Pad(padding, padding_mode="minimum")(subject)
