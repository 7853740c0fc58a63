"""Cleaning a predicted mask: organs that are one piece of tissue keep only their largest piece."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage

from medseg.metrics import label_boxes


def keep_largest_component(labels: np.ndarray, label_ids: Iterable[int], in_place: bool = False) -> np.ndarray:
    """Set every connected piece (26-connected) of each listed organ but its largest to background.

    Works inside each organ's bounding box, so a 512x512x300 mask costs little. Modifies a copy, or
    `labels` itself with `in_place` (a fresh prediction: copying a 512x512x300 mask costs 0.2 s).
    """
    ids = list(label_ids)
    if not ids:
        return labels
    out = labels if in_place else labels.copy(order="K")  # keeps a Fortran-ordered mask Fortran-ordered
    structure = np.ones((3, 3, 3), bool)
    boxes = label_boxes(labels, max_label=max(ids))
    for label_id in ids:
        box = boxes[label_id - 1] if label_id - 1 < len(boxes) else None
        if box is None:
            continue
        organ = out[box] == label_id
        pieces, count = ndimage.label(organ, structure)
        if count <= 1:
            continue
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0
        region = out[box]
        region[(pieces != 0) & (pieces != int(sizes.argmax()))] = 0
    return out
