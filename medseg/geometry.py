"""Mask geometry: bounding boxes, margins and voxel counts, in one place for every stage.

A box is a tuple of slices with start and stop (no step), one per array axis, so `array[box]` is the
block it bounds. Training, inference, evaluation and the overlays all ask the same questions of a
mask (where is each organ, where is anything, how large); the answers live here, once.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

Box = tuple[slice, ...]


def label_boxes(labels: np.ndarray, max_label: int = 0) -> list[Box | None]:
    """`scipy.ndimage.find_objects`, reading the array in its own memory order.

    find_objects walks the last axis fastest: on a Fortran-ordered (X, Y, Z) mask, the layout SimpleITK
    hands over, that is against the memory and ~6x slower, so such a mask is read through its C-ordered
    transpose and the boxes turned back. It also costs ~10 ns a voxel, so a 3D mask is first cut to
    the block that holds any label (`np.any` along the slowest axis is ~50x cheaper), as organs fill
    a small part of a CT.
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    if labels.flags.f_contiguous and not labels.flags.c_contiguous:
        return [None if box is None else box[::-1] for box in label_boxes(labels.T, max_label)]
    if labels.ndim != 3 or labels.size < 1 << 20:
        return ndimage.find_objects(labels, max_label)
    block = nonzero_box(labels)
    if block is None:
        return [None] * max_label
    found = ndimage.find_objects(labels[block], max_label)
    return [None if box is None else tuple(slice(s.start + b.start, s.stop + b.start) for s, b in zip(box, block))
            for box in found]


def nonzero_box(labels: np.ndarray) -> Box | None:
    """The bounding box of every non-zero voxel of an (X, Y, Z) array; None if there is none.

    Reads each voxel once, along the memory order: ~10 ms for a 512x512x200 mask.
    """
    labels = np.asarray(labels)
    if labels.flags.f_contiguous and not labels.flags.c_contiguous:
        box = nonzero_box(labels.T)
        return None if box is None else box[::-1]
    slabs = np.flatnonzero(labels.any(axis=(1, 2)))
    if len(slabs) == 0:
        return None
    block = labels[slabs[0]:slabs[-1] + 1]
    rows, columns = block.any(axis=(0, 2)), block.any(axis=(0, 1))
    return (slice(int(slabs[0]), int(slabs[-1]) + 1),
            slice(int(np.argmax(rows)), len(rows) - int(np.argmax(rows[::-1]))),
            slice(int(np.argmax(columns)), len(columns) - int(np.argmax(columns[::-1]))))


def voxel_counts(labels: np.ndarray, minlength: int = 256) -> np.ndarray:
    """Voxels of each label value in an integer label map, as int64 (`np.bincount` of every voxel).

    torch's bincount takes uint8 as it is; numpy's first converts every voxel to int64 (0.4 GB for a
    512x512x200 mask) and is ~10x slower.
    """
    import torch

    flat = np.asarray(labels).ravel(order="K")  # memory order: no copy for a Fortran-ordered array
    if flat.dtype != np.uint8:
        return np.bincount(flat, minlength=minlength)
    return torch.bincount(torch.from_numpy(flat), minlength=minlength).numpy()


def axis_order(direction: Sequence[float]) -> tuple[int, int, int]:
    """`perm[w]`: the voxel axis running closest to world axis w (LPS: 2 is the head-foot axis).

    `direction` is a grid's 3x3 row-major direction matrix (column c: world direction of voxel axis c).
    Each voxel axis goes to exactly one world axis, the assignment closest overall, as
    `sitk.DICOMOrient` chooses it, so a tilted scan still gets three distinct axes.
    """
    matrix = np.abs(np.reshape(np.asarray(direction, dtype=float), (3, 3)))
    return max(itertools.permutations(range(3)), key=lambda p: sum(matrix[w, p[w]] for w in range(3)))


def bounding_box(mask: np.ndarray, margin: int = 1) -> Box | None:
    """Smallest box holding every nonzero voxel of an array of any dimension, grown by `margin` voxels
    and clipped to the array; None for an empty mask."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(np.any(mask, axis=others))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return grow(tuple(box), mask.shape, margin)


def grow(box: Sequence[slice], shape: Sequence[int], margin: int | Sequence[int]) -> Box:
    """`box` grown by `margin` voxels on every side (one number, or one per axis), clipped to `shape`."""
    margins = [margin] * len(shape) if isinstance(margin, int) else list(margin)
    return tuple(slice(max(b.start - m, 0), min(b.stop + m, n)) for b, m, n in zip(box, margins, shape))


def grow_mm(box: Sequence[slice], spacing: Sequence[float], shape: Sequence[int], margin_mm: float) -> Box:
    """`box` grown by `margin_mm` millimetres on every side (whole voxels, rounded up), clipped to `shape`."""
    return grow(box, shape, [math.ceil(margin_mm / s) for s in spacing])


def union(boxes: Iterable[Sequence[slice]]) -> Box | None:
    """The smallest box holding every box; None for none."""
    boxes = list(boxes)
    if not boxes:
        return None
    return tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(len(boxes[0])))


def organ_boxes(*label_maps: np.ndarray) -> dict[int, Box]:
    """Label value -> bounding box of that value in the union of the maps, for the values present.

    One pass over each map (`label_boxes`): the overlays find every organ's box once and hand them to
    every view, and evaluation crops each organ to it before measuring distances.
    """
    found: dict[int, list[Box]] = {}
    for labels in label_maps:
        labels = np.asarray(labels)
        if labels.dtype.kind == "b":
            labels = labels.view(np.uint8)
        if labels.size == 0:
            continue
        for value, box in enumerate(label_boxes(labels), start=1):
            if box is not None:
                found.setdefault(value, []).append(box)
    return {value: union(boxes) for value, boxes in found.items()}


BODY_HU = -500.0  # air is ~-1000 HU and lung ~-800, fat ~-100: anything denser is patient (or table)


def body_box(hu: torch.Tensor, roi: Sequence[int], threshold: float = BODY_HU, margin: int = 2,
             min_voxels: int = 16) -> Box:
    """The bounding box of everything denser than air, plus `margin` voxels, at least a window large.

    Sliding windows over the air around a patient (a third to half of a 512 x 512 CT slice) only
    confirm background; TotalSegmentator and nnU-Net crop them away too. A plane counts as body when
    it holds at least `min_voxels` such voxels, so specks of noise in the air do not stretch the box.

    Args:
        hu: (X, Y, Z) on the model grid, in Hounsfield units.
        roi: the window size; the box is grown (inside the volume) to at least this size.
    """
    import torch

    dense = hu > threshold
    # Dense voxels per plane of each axis, from two passes over the volume (three sums over two axes
    # each cost 3x as much on a 512 x 512 CT).
    across_z, across_y = dense.sum(2, dtype=torch.int32), dense.sum(1, dtype=torch.int32)
    per_plane = (across_z.sum(1), across_z.sum(0), across_y.sum(0))
    box = []
    for size, window, counts in zip(hu.shape, roi, per_plane):
        planes = torch.nonzero(counts >= min_voxels).flatten()
        if len(planes) == 0:
            return tuple(slice(0, n) for n in hu.shape)
        low, high = int(planes[0]) - margin, int(planes[-1]) + 1 + margin
        short = max(0, min(window, size) - (high - low))
        low, high = low - short // 2, high + short - short // 2
        if low < 0:  # slide back inside the volume, keeping the size
            low, high = 0, high - low
        if high > size:
            low, high = low - (high - size), size
        box.append(slice(max(0, low), high))
    return tuple(box)


def mask_centre(organ: np.ndarray, box: Sequence[slice] | None = None) -> np.ndarray | None:
    """Voxel index (i, j, k) of a boolean mask's centre of mass, in the whole array when the mask is cut
    to `box`; None for an empty mask. Three sums over two axes: no list of voxel coordinates."""
    count = int(np.count_nonzero(organ))
    if count == 0:
        return None
    starts = [s.start for s in box] if box is not None else [0, 0, 0]
    return np.array([float(np.dot(organ.sum(axis=tuple(a for a in range(organ.ndim) if a != axis)), np.arange(n)))
                     / count + start for axis, (n, start) in enumerate(zip(organ.shape, starts))])


PIECE_SHARE = 0.1  # a piece of an organ counts when it holds at least this share of the largest piece's voxels
PIECE_TYPICAL_SHARE = 0.01  # ... and this share of the organ's typical size: a few stray voxels are noise, not a
# second piece. Relative, so that it means the same for a 300 mL bladder, a 0.05 mL cochlea and an 80 um2 nucleus.


def label_pieces(mask: np.ndarray) -> np.ndarray:
    """26-connected pieces of a boolean mask (3D, or 2D), numbered from 1 (uint32, the mask's shape).

    cc3d 4.1 fails on small thin boxes holding scattered voxels ("Label 2 cannot be mapped to union-find
    array of length 2" for two voxels in one row; "maximum length exception" for five in a 1x3x5 box):
    a box under 3 voxels thick in any axis is labelled with a border of background, which changes no
    piece, and should cc3d still fail, scipy labels it (slower, same pieces).
    """
    import cc3d

    mask = np.asarray(mask, dtype=bool)
    thin = min(mask.shape) < 3
    padded = np.pad(mask, 1) if thin else mask
    try:
        labels = cc3d.connected_components(padded, connectivity=26, out_dtype=np.uint32)
    except RuntimeError:
        from scipy import ndimage

        labels = ndimage.label(padded, structure=np.ones((3,) * mask.ndim, bool), output=np.uint32)[0]
    return labels[tuple(slice(1, -1) for _ in mask.shape)] if thin else labels


def piece_sizes(mask: np.ndarray) -> np.ndarray:
    """Voxels in each 26-connected piece of a boolean mask (best cut to the organ's box), largest first."""
    return np.sort(np.bincount(label_pieces(mask).ravel(order="K"))[1:])[::-1]


def significant_pieces(sizes: Sequence[float], typical: float | None = None) -> int:
    """How many pieces (`piece_sizes`, largest first) count as pieces of their own: PIECE_SHARE of the largest,
    and PIECE_TYPICAL_SHARE of `typical`, the organ's usual size (training's median) in the unit of `sizes`;
    None (not known): the share of the largest alone.

    Training labels (the fingerprint) and predictions (the QA flags) are counted the same way.
    """
    if len(sizes) == 0:
        return 0
    least = max(PIECE_SHARE * float(sizes[0]), PIECE_TYPICAL_SHARE * (typical or 0.0))
    return int(sum(1 for size in sizes if size >= least)) or 1
