"""Training augmentation from the task file, built from TorchIO transforms.

Subjects arrive in canonical RAS orientation (see `medseg.preprocess`), so the patient's left-right axis
is voxel axis 0. A left-right flip mirrors the anatomy: what was the left femoral head now lies on the
right, so paired labels are swapped with the flip, keeping "left" on the patient's left in world space.

A 2D task's subjects are (C, X, Y, 1): rotations turn in-plane only (about the singleton axis), scaling
and blur leave that axis alone, elastic deformation moves pixels in-plane (TorchIO keeps a singleton
axis still) and the task file cannot ask for a flip along it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchio as tio

from medseg.config import PATIENT_AXES, Task
from medseg.data.partial import CONTOURED, set_contoured


class SwapLabels(tio.transforms.Transform):
    """Relabel a label map with `order` (`Task.mirrored_order`: left <-> right); images are untouched.

    A subject's contoured-organ mask is reordered with it: a case that drew only the left parotid has,
    once flipped, drawn only the right one.
    """

    def __init__(self, order: Sequence[int], **kwargs):
        super().__init__(**kwargs)
        self.order = tuple(order)
        self.args_names = ["order"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        if self.order == tuple(range(len(self.order))):
            return subject
        for image in subject.get_images(intensity_only=False):
            if isinstance(image, tio.LabelMap):
                # values beyond the organs (an ignore label) keep their value
                table = torch.arange(max(len(self.order), int(image.data.max()) + 1))
                table[:len(self.order)] = torch.as_tensor(self.order)
                image.set_data(table[image.data.long()].to(image.data.dtype))
        if CONTOURED in subject:
            set_contoured(subject, subject[CONTOURED][..., list(self.order)])
        return subject


class RandomContrast(tio.transforms.augmentation.RandomTransform, tio.transforms.IntensityTransform):
    """Scale deviations from the image mean by a random factor (nnU-Net's contrast augmentation)."""

    def __init__(self, factor_range: tuple[float, float] = (0.75, 1.25), **kwargs):
        super().__init__(**kwargs)
        self.factor_range = factor_range

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            factor = self.sample_uniform(*self.factor_range)
            data = image.data.float()
            mean = data.mean()
            image.set_data((data - mean) * factor + mean)
        return subject


def flip_left_right(order: Sequence[int], p: float = 1.0) -> tio.Transform:
    """Left-right flip of a RAS subject that keeps paired organs on their own side (`Task.mirrored_order`).

    The flip and the label swap happen together, so they share one probability `p`.
    """
    return tio.Compose([tio.Flip(axes=(0,)), SwapLabels(order)], p=p)


def build_augmentation(task: Task) -> tio.Transform | None:
    """The task's augmentation list as one TorchIO transform (spatial first, then intensity)."""
    aug = task.augmentation
    planar = task.dimensions == 2
    steps: list[tio.Transform] = []
    if aug.affine:
        scales, degrees = aug.affine.scales, aug.affine.degrees
        if planar:  # (min, max) per axis: in-plane scaling, rotation about the singleton axis only
            scales = (1 - scales, 1 + scales) * 2 + (1.0, 1.0)
            degrees = (0.0, 0.0, 0.0, 0.0, -degrees, degrees)
        steps.append(tio.RandomAffine(scales=scales, degrees=degrees, p=aug.affine.p, default_pad_value="minimum"))
    if aug.elastic:
        shift = aug.elastic.max_displacement
        steps.append(tio.RandomElasticDeformation(num_control_points=aug.elastic.num_control_points,
                                                  max_displacement=(shift, shift, 0.0) if planar else shift,
                                                  p=aug.elastic.p))
    if aug.flip:
        if "LR" in aug.flip.axes:
            steps.append(flip_left_right(task.mirrored_order(), p=aug.flip.p))
        other = tuple(axis for axis in task.flip_axes() if axis != PATIENT_AXES["LR"])
        if other:
            steps.append(tio.RandomFlip(axes=other, flip_probability=aug.flip.p))
    if aug.noise:
        steps.append(tio.RandomNoise(std=(0, aug.noise.std), p=aug.noise.p))
    if aug.blur:
        std = aug.blur.std * 2 + (0.0, 0.0) if planar else aug.blur.std
        steps.append(tio.RandomBlur(std=std, p=aug.blur.p))
    if aug.gamma:
        # Gamma needs non-negative intensities; TorchIO rescales internally only for positive data,
        # so it is applied to the normalised image shifted to its minimum and shifted back.
        steps.append(_ShiftedGamma(aug.gamma.log_gamma, p=aug.gamma.p))
    if aug.contrast:
        steps.append(RandomContrast(aug.contrast.range, p=aug.contrast.p))
    return tio.Compose(steps) if steps else None


class _ShiftedGamma(tio.transforms.augmentation.RandomTransform, tio.transforms.IntensityTransform):
    """Random gamma on normalised intensities (which are negative in places): shift, gamma, shift back."""

    def __init__(self, log_gamma: float, **kwargs):
        super().__init__(**kwargs)
        self.log_gamma = log_gamma

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            gamma = float(torch.exp(torch.empty(1).uniform_(-self.log_gamma, self.log_gamma)))
            data = image.data.float()
            low, high = data.min(), data.max()
            span = (high - low).clamp_min(1e-6)
            image.set_data(((data - low) / span) ** gamma * span + low)
        return subject
