"""Masks to contours and back, one slice at a time: the geometry of an RTSTRUCT.

A planning system fills a contour by testing points against it with the even-odd rule, and many
compute an organ's volume from the contours' areas. Drawn through voxel centres (as a naive exporter
does) a contour shrinks every organ by half a voxel all round. Here each contour runs exactly along
the voxel edges, the outline of the voxels themselves: filling it at voxel centres (or any finer
sampling) gives back the mask, and its area is the organ's voxel count. Marching squares
(scikit-image) at level 0.5 traces the outline through the midpoints of the voxel edges and cuts each
staircase corner diagonally (1/8 voxel lost per convex corner, -1.4% to -6% of the volume for head and
neck organs on a 3.9 mm grid); the corner is put back, which turns the outline into the exact staircase.
"""

from __future__ import annotations

import numpy as np

from medseg.dicom import require


def _drop_straight_vertices(polygon: np.ndarray) -> np.ndarray:
    """Remove vertices in the middle of straight runs (marching squares puts one on every voxel edge)."""
    before, after = np.roll(polygon, 1, axis=0), np.roll(polygon, -1, axis=0)
    a, b = polygon - before, after - polygon
    turn = np.abs(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]) > 1e-9
    return polygon[turn]


def _staircase(contour: np.ndarray) -> np.ndarray:
    """Put back the voxel corner that marching squares cuts off between two edge midpoints at right angles.

    Every vertex of a level-0.5 contour of a binary slice is the midpoint of a voxel edge, so one of its
    coordinates is a half-integer; a segment between a midpoint on a row edge and one on a column edge
    cuts the corner whose coordinates are those two half-integers.
    """
    after = np.roll(contour, -1, axis=0)
    on_edge = np.isclose(contour % 1, 0.5)  # (N, 2): which coordinate lies on a voxel edge line
    diagonal = on_edge[:, 0] != np.roll(on_edge, -1, axis=0)[:, 0]
    corners = np.where(on_edge, contour, after)
    both = np.empty((2 * len(contour), 2))
    both[0::2], both[1::2] = contour, corners
    keep = np.ones(len(both), bool)
    keep[1::2] = diagonal
    return both[keep]


def mask_to_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Closed polygons around a 2D slice's organ voxels, drawn on the voxel edges.

    Args:
        mask: (I, J) slice, non-zero inside the organ.

    Returns:
        One (N, 2) float array of (i, j) voxel-index coordinates per outline, the closing vertex not
        repeated (DICOM's CLOSED_PLANAR convention): outer boundaries of every piece and the boundaries
        of their holes alike; filling them with the even-odd rule (`polygons_to_mask`) restores `mask`.
        Every vertex is a voxel corner. Voxels touching only at a corner are separate pieces
        (4-connectivity): their outlines meet at that corner and do not cross.
    """
    measure = require("skimage.measure", "drawing RTSTRUCT contours")
    mask = np.asarray(mask) != 0
    if not mask.any():
        return []
    padded = np.pad(mask, 1).astype(np.float32)  # zero border: every outline closes
    polygons = []
    for contour in measure.find_contours(padded, 0.5, fully_connected="low"):
        polygon = _drop_straight_vertices(_staircase(contour[:-1] - 1.0))  # find_contours repeats the first vertex
        polygons.append(polygon)
    return polygons


def polygons_to_mask(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Fill polygons on a slice as a planning system does: voxel centres, even-odd rule.

    Args:
        polygons: (N, 2) arrays of (i, j) voxel-index coordinates; a polygon inside another is a hole.
        shape: (I, J) of the slice; parts of polygons outside it are clipped.

    Returns:
        (I, J) bool mask of the voxels whose centre lies inside an odd number of polygons.
    """
    draw = require("skimage.draw", "filling RTSTRUCT contours")
    mask = np.zeros(shape, dtype=bool)
    for polygon in polygons:
        polygon = np.asarray(polygon, dtype=float)
        if len(polygon) < 3:
            continue  # a point or a line encloses no voxel centre
        rows, cols = draw.polygon(polygon[:, 0], polygon[:, 1], shape=shape)
        inside = np.zeros(shape, dtype=bool)
        inside[rows, cols] = True  # a polygon touching itself must not cancel its own voxels
        mask ^= inside
    return mask
