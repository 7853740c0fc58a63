"""Test-time augmentation: logits averaged over mirrored copies of the scan."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medseg.infer.stitching import sliding_window_logits


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
    return total / len(flips)
