"""Which slices to show, and how: radiological orientation from any voxel order, slices through the organs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medseg.geometry import Box, axis_order, grow_mm, organ_boxes, union
from medseg.io import Grid

TILES = 8  # slices per view
DISAGREEMENT_TILES = 2  # of TILES, with a reference: the slices where reference and prediction differ most
MARGIN_MM = 20.0  # tissue shown around the organs' bounding box


@dataclass(frozen=True)
class View:
    name: str
    axis: int  # canonical (L, P, S) axis the slices are taken along
    edges: tuple[str, str, str, str]  # letters on the top, bottom, left and right edges
    caption: str


VIEWS = (
    View("axial", 2, ("A", "P", "R", "L"), "seen from the feet: patient's right on image left, anterior up"),
    View("coronal", 1, ("S", "I", "R", "L"), "seen from the front: patient's right on image left, superior up"),
    View("sagittal", 0, ("S", "I", "A", "P"), "seen from the patient's left: anterior on image left, superior up"),
)


def canonical(array: np.ndarray, grid: Grid) -> tuple[np.ndarray, Grid]:
    """An (X, Y, Z) array with its axes permuted and flipped to point to the patient's Left, Posterior, Superior.

    The nearest axis-aligned orientation, as `sitk.DICOMOrient(image, "LPS")`: voxels are only
    reordered (a view, no copy), so an oblique scan keeps its small tilt in the returned grid.
    """
    direction = np.reshape(grid.direction, (3, 3))
    perm = axis_order(grid.direction)  # perm[w] is the voxel axis running closest to world axis w
    shape = tuple(grid.shape[p] for p in perm)
    index_map = np.eye(4)[:, [*perm, 3]]  # canonical index -> file index
    out = np.transpose(array, perm)
    for w, p in enumerate(perm):
        if direction[w, p] < 0:
            out = np.flip(out, w)
            index_map[p, w], index_map[p, 3] = -1.0, shape[w] - 1
    affine = grid.affine @ index_map
    spacing = tuple(grid.spacing[p] for p in perm)
    return out, Grid(shape, spacing, tuple(affine[:3, 3]), tuple((affine[:3, :3] / np.asarray(spacing)).ravel()))


def view_slice(volume: np.ndarray, view: View, index: int) -> np.ndarray:
    """Slice `index` of a canonical (L, P, S) volume as a picture (row 0 at the top)."""
    if view.axis == 2:
        return volume[:, :, index].T  # rows anterior -> posterior, columns right -> left
    if view.axis == 1:
        return volume[:, index, :].T[::-1]  # rows superior -> inferior, columns right -> left
    return volume[index, :, :].T[::-1]  # rows superior -> inferior, columns anterior -> posterior


def view_spacing(spacing: Sequence[float], view: View) -> tuple[float, float]:
    """(row, column) pixel size in mm of `view_slice` pictures of a canonical volume with `spacing`."""
    rows, cols = {2: (1, 0), 1: (2, 0), 0: (2, 1)}[view.axis]
    return float(spacing[rows]), float(spacing[cols])


def slice_position(grid: Grid, axis: int, index: int) -> str:
    """World position of a slice's centre along its axis, with the direction letter: 'S 12.5 mm'."""
    centre = [(n - 1) / 2 for n in grid.shape]
    centre[axis] = index
    value = float((grid.affine @ [*centre, 1.0])[axis])
    letter = ("RL", "AP", "IS")[axis][value >= 0]
    return f"{letter} {abs(value):.1f} mm"


def mask_extents(prediction: np.ndarray, reference: np.ndarray | None = None) -> list[dict[int, Box]]:
    """Each organ's box in the prediction, and in the reference where there is one: found once, and
    handed to every view, the thumbnail and the crop."""
    return [organ_boxes(prediction)] + ([organ_boxes(reference)] if reference is not None else [])


def shown_box(extents: Sequence[dict[int, Box]], shape: Sequence[int], spacing: Sequence[float]) -> Box:
    """What the overlays show: every organ's box together, grown by MARGIN_MM; the whole volume if no organ."""
    together = union(box for found in extents for box in found.values())
    return tuple(slice(0, n) for n in shape) if together is None else grow_mm(together, spacing, shape, MARGIN_MM)


def choose_slices(prediction: np.ndarray, axis: int, count: int = TILES,
                  reference: np.ndarray | None = None,
                  extents: Sequence[dict[int, tuple[slice, ...]]] | None = None) -> list[tuple[int, int]]:
    """Slices to show along `axis` of (X, Y, Z) label maps, as sorted (index, differing voxels) pairs.

    With a reference, the DISAGREEMENT_TILES slices where more voxels differ than anywhere else are
    chosen first and carry their count of differing voxels (the other slices carry 0). The rest are
    spread over the slices that hold an organ, denser where more organs meet; an organ whose central
    half no slice crosses gets one through its centre, so that no organ is shown only by a sliver at
    its edge. Without any organ, the slices spread evenly over the whole volume. `extents`: the
    `mask_extents` of prediction (and reference), where the caller has them already.
    """
    boxes = extents or mask_extents(prediction, reference)
    spans = [(box[axis].start, box[axis].stop - 1) for found in boxes for box in found.values()]
    low, high = (min(s[0] for s in spans), max(s[1] for s in spans)) if spans else (0, prediction.shape[axis] - 1)
    picks: dict[int, int] = {}
    if reference is not None:
        others = tuple(a for a in range(3) if a != axis)
        differs = np.count_nonzero(prediction != reference, axis=others)
        apart = max((high - low + 1) / count, 2)  # disagreement slices at least one spread step apart
        for index in np.argsort(-differs, kind="stable"):
            if len(picks) == DISAGREEMENT_TILES or differs[index] == 0:
                break
            if all(abs(int(index) - p) >= apart for p in picks):
                picks[int(index)] = int(differs[index])
    # Spread in proportion to how many organs each slice crosses: no tile falls in a gap between organs,
    # and where organs meet (the pelvic midline, seen sagittally) gets more tiles than one organ alone.
    weight = np.zeros(prediction.shape[axis])
    for start, stop in spans:
        weight[start:stop + 1] += 1
    if not spans:
        weight[:] = 1
    slots = max(count - len(picks), 0)
    cumulative = np.cumsum(weight)
    targets = np.searchsorted(cumulative, (np.arange(slots) + 0.5) / slots * cumulative[-1], side="right")
    candidates = np.flatnonzero(weight).tolist()
    gap = max(1, len(candidates) // (2 * count))  # tiles closer than this would show nearly the same picture
    taken, spread = list(picks), []
    for target in targets:
        free = ([c for c in candidates if all(abs(c - t) >= gap for t in taken)]
                or [c for c in candidates if c not in taken])
        if not free:
            break
        spread.append(min(free, key=lambda c: abs(c - target)))
        taken.append(spread[-1])
    locked: set[int] = set()
    for start, stop in sorted(spans, key=lambda s: s[1] - s[0]):  # small organs first: they are easiest to miss
        quarter = (stop - start) // 4
        core = (start + quarter, stop - quarter)
        hits = [i for i, s in enumerate(spread) if core[0] <= s <= core[1]]
        if any(core[0] <= p <= core[1] for p in picks) or hits:
            locked.update(hits[:1])
            continue
        free = [i for i in range(len(spread)) if i not in locked]
        if free:
            nearest = min(free, key=lambda i: abs(spread[i] - (start + stop) // 2))
            spread[nearest] = (start + stop) // 2
            locked.add(nearest)
    chosen = {s: 0 for s in spread} | picks
    return sorted(chosen.items())


