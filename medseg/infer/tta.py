"""Test-time augmentation: class probabilities averaged over mirrored copies of the scan.

Each copy's logits go through the softmax before the average, as nnU-Net v1 did and as an ensemble
of models averages its members (`medseg.infer.ensemble`): a single model with flips and the ensemble
of that one model then give the same probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medseg.infer.stitching import sliding_window_logits

def flips_for(shape: Sequence[int], tta: bool, axes: Sequence[int] = (0, 1, 2)) -> list[tuple[int, ...]]:
    """The copies to average for an (X, Y, Z) volume: the volume alone, or with `tta` also its mirror along
    each of `axes` longer than one voxel.

    `axes` are those training flipped along (`Task.flip_axes`): a head-and-neck model that only ever saw
    left-right mirrors would be shown an upside-down head by a head-foot flip, and its guess there would
    be averaged in (nnU-Net likewise mirrors only the axes it trained with). Mirroring a 2D image's
    singleton axis (X, Y, 1) would give the same picture again and cost a whole inference pass.
    """
    return [()] + [(axis,) for axis in sorted(axes) if tta and shape[axis] > 1]


def softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over classes (dim 0) in place: a 512x512 CT's logits are ~0.5 GB, a copy as much again."""
    logits.sub_(logits.amax(0, keepdim=True)).exp_()
    return logits.div_(logits.sum(0, keepdim=True))


def flipped_logits(network: torch.nn.Module, image: torch.Tensor, mirrored_order: Sequence[int],
                   flips: Sequence[tuple[int, ...]], **window) -> torch.Tensor:
    """Average logits over mirrored copies of a RAS volume.

    A left-right flip (axis 0) turns a left organ into a right one, so its logits are put back in the
    task's order with `mirrored_order` (`Task.mirrored_order`), as training augmentation does.

    Args:
        image: (C, X, Y, Z) preprocessed volume.
        flips: the axes to mirror in each copy; `()` is the scan as it is.
        window: `sliding_window_logits`'s arguments.
    Returns:
        (K, X, Y, Z) float32 mean logits.
    """
    order = list(mirrored_order)
    swaps = order != list(range(len(order)))
    total = None
    for axes in flips:
        dims = [a + 1 for a in axes]
        logits = sliding_window_logits(network, image.flip(dims) if dims else image, **window)
        if dims:
            logits = logits.flip(dims)
        if 0 in axes and swaps:
            logits = logits[order]
        total = logits if total is None else total + logits
    return total / len(flips)  # also makes the windows' inference-mode tensor an ordinary one, for in-place use


def flipped_probabilities(network: torch.nn.Module, image: torch.Tensor, mirrored_order: Sequence[int],
                          flips: Sequence[tuple[int, ...]], **window) -> torch.Tensor:
    """Average class probabilities over mirrored copies of a RAS volume (each copy's softmax, summed as
    they come: memory for the sum and one copy). Arguments as `flipped_logits`'s.

    Returns:
        (K, X, Y, Z) float32 mean probabilities.
    """
    total = None
    for axes in flips:
        probabilities = softmax_(flipped_logits(network, image, mirrored_order, [axes], **window))
        total = probabilities if total is None else total.add_(probabilities)
    return total.div_(len(flips)) if len(flips) > 1 else total
