"""From a scan as read to what the network sees: canonical orientation, target spacing, intensities.

The same `Preprocessing` (stored in every model folder) runs in training, validation and `medseg
predict`, so a model never sees data prepared differently from what it was trained on. TorchIO does
the spatial work; intensities follow nnU-Net: CT is clipped (task window, or the dataset's foreground
0.5/99.5 percentiles) and normalised with the dataset's foreground mean and std; MR is z-scored per image.

Prediction takes a shorter road to the same place: `to_model_grid` works out the grid that TorchIO's
ToCanonical + Resample would produce from the scan's geometry alone, and resamples the scan onto it in
one SimpleITK call, straight from the file's integer voxels. A 512x512x300 CT then never exists as a
float copy at full resolution (TorchIO's road makes three), and the result equals TorchIO's (a test
checks it for every orientation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
import torchio as tio

from medseg.config import Task
from medseg.errors import InputError
from medseg.io import Grid, from_array, to_array


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


def transform(prep: Preprocessing) -> tio.Transform:
    """TorchIO pipeline: RAS, target spacing, intensities. Labels are resampled nearest-neighbour."""
    steps: list[tio.Transform] = [tio.ToCanonical(), tio.Resample(prep.spacing)]
    if prep.normalize != "none" or any(c.clip for c in prep.channels):
        steps.append(tio.Lambda(partial(_normalized, prep=prep), types_to_apply=[tio.INTENSITY]))
    return tio.Compose(steps)


def _normalized(tensor: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    return normalize_(tensor.to(torch.float32), prep)  # TorchIO hands the transform a copy of the subject


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


# ------------------------------------------------------------------------- prediction's road


def model_grid(spacing: tuple[float, float, float], grid: Grid) -> Grid:
    """The grid `ToCanonical()` then `Resample(spacing)` put a scan on, from its geometry alone.

    The arithmetic is TorchIO's own (nibabel's reorientation, then `Resample.get_reference_image`:
    floor of the extent over the new spacing, centred on the old extent), so that sizes that sit on a
    rounding edge (128 x 3.906 / 3.906) come out as TorchIO makes them.
    """
    from torchio.data.io import get_sitk_metadata_from_ras_affine

    ras = grid.ras_affine
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(ras), nib.orientations.axcodes2ornt("RAS"))
    canonical = ras @ nib.orientations.inv_ornt_aff(ornt, grid.shape)
    shape = nib.orientations.apply_orientation(np.broadcast_to(np.uint8(0), grid.shape), ornt).shape  # a view
    origin, old_spacing, direction = (np.asarray(v, dtype=float) for v in get_sitk_metadata_from_ras_affine(canonical))
    matrix = direction.reshape(3, 3)
    old_size = np.asarray(shape)
    centre = (origin + matrix @ ((old_size - 1) * old_spacing) + origin) / 2
    new_spacing = np.asarray(spacing, dtype=float)
    new_size = np.floor(old_size * old_spacing / new_spacing)
    new_size[old_size == 1] = 1
    new_origin = centre - matrix @ ((new_size - 1) / 2 * new_spacing)
    return Grid(tuple(int(n) for n in new_size), tuple(new_spacing.tolist()), tuple(new_origin.tolist()),
                tuple(direction.tolist()))


def to_model_grid(image: np.ndarray, grid: Grid, spacing: tuple[float, float, float]) -> tuple[torch.Tensor, Grid]:
    """Linear resampling of every channel onto `model_grid`, as float32 in the scan's own units.

    Args:
        image: (C, X, Y, Z), any numeric dtype (keep a CT's int16: it is half the memory of float32).
    Returns:
        (C, X', Y', Z') float32 and the model grid; the grid's `ras_affine` is what TorchIO would give.
    """
    target = model_grid(spacing, grid)
    channels = []
    for channel in image:
        resampled = sitk.Resample(from_array(channel, grid), list(target.shape), sitk.Transform(), sitk.sitkLinear,
                                  target.origin, target.spacing, target.direction, 0.0, sitk.sitkFloat32)
        channels.append(torch.from_numpy(to_array(resampled)))
    return torch.stack(channels) if len(channels) > 1 else channels[0][None], target


def normalize_(volume: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """Intensities as the model expects them, in place on a (C, X, Y, Z) float32 volume.

    Each channel is clipped (task window or dataset percentiles) and scaled (dataset mean and std);
    `image` normalisation then z-scores the whole volume, one mean and std over all channels together,
    as TorchIO's ZNormalization does. Training (`transform`) and prediction both call this.
    """
    if prep.normalize == "dataset" or any(c.clip for c in prep.channels):
        for channel, stats in zip(volume, prep.channels):
            if stats.clip is not None:
                channel.clamp_(*stats.clip)
            channel.sub_(stats.mean).div_(stats.std)
    if prep.normalize == "image":
        std = volume.std()
        if std == 0:
            raise InputError("image has the same value everywhere (standard deviation 0); cannot normalise it")
        volume.sub_(volume.mean()).div_(std)
    return volume
