"""Cleaning a predicted mask: organs that are one piece of tissue keep only their largest piece."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from medseg.geometry import label_boxes, label_pieces


def keep_largest_component(labels: np.ndarray, label_ids: Iterable[int], in_place: bool = False,
                           pieces: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """Set every connected piece (26-connected) of each listed organ but its largest to background.

    Works inside each organ's bounding box, so a 512x512x300 mask costs little, and on two organs at a
    time (the labelling lets go of the GIL; each organ only clears its own voxels, so the threads
    never touch the same voxel). Modifies a copy, or `labels` itself with `in_place` (a fresh
    prediction: copying a 512x512x300 mask costs 0.2 s). `pieces`, when given, receives each listed
    organ's piece sizes in voxels, largest first, as they were before the cleaning (the QA flags
    read them: `medseg.infer.qa`), without labelling anything twice.
    """
    ids = list(label_ids)
    if not ids:
        return labels
    out = labels if in_place else labels.copy(order="K")  # keeps a Fortran-ordered mask Fortran-ordered
    boxes = label_boxes(labels, max_label=max(ids))
    found = [(label_id, boxes[label_id - 1]) for label_id in ids if label_id - 1 < len(boxes) and boxes[label_id - 1]]
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="medseg-components") as pool:
        jobs = {label_id: pool.submit(_keep_largest_piece, out, label_id, box) for label_id, box in found}
        for label_id, job in jobs.items():
            sizes = job.result()
            if pieces is not None:
                pieces[label_id] = sizes
    return out


def _keep_largest_piece(labels: np.ndarray, label_id: int, box: tuple[slice, ...]) -> np.ndarray:
    """Clear all but the largest piece of one organ inside its box; returns the piece sizes, largest first."""
    # cc3d labels an organ's box ~9x faster than scipy.ndimage.label (0.03 vs 0.24 s for a bladder's
    # 434 x 288 x 200 box), with the same pieces (26-connectivity).
    import torch

    region = labels[box]
    organ = region == label_id
    pieces = label_pieces(organ)
    # torch counts the piece ids as they are (int32 view: far fewer than 2**31 pieces); numpy's
    # bincount would first copy them to int64
    sizes = torch.bincount(torch.from_numpy(pieces.ravel(order="K").view(np.int32)))
    found = np.sort(sizes[1:].numpy())[::-1]
    if len(sizes) <= 2:  # one piece (or none)
        return found
    sizes[0] = 0
    organ &= pieces != int(sizes.argmax())
    del pieces
    region[organ] = 0
    return found
