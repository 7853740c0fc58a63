"""Mask -> polygons -> mask is exact on hand-made slices: contours lie on voxel edges, holes fill even-odd."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.dicom.contours import mask_to_polygons, polygons_to_mask


def _slice(rows: list[str]) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in rows])


SLICES = {
    "square": ["......", ".###..", ".###..", ".###..", "......"],
    "ring-with-hole": [".......", ".#####.", ".#...#.", ".#.#.#.", ".#...#.", ".#####.", "......."],
    "two-pieces": ["##....", "##..##", "....##", "......"],
    "diagonal-touching": ["#...", ".#..", "..#.", "...#"],
    "one-voxel": ["...", ".#.", "..."],
    "at-the-border": ["###", "#.#", "###"],
    "staircase": ["#....", "##...", "###..", "####.", "#####"],
}


@pytest.mark.parametrize("name", SLICES)
def test_mask_polygons_mask_is_exact(name):
    mask = _slice(SLICES[name])
    polygons = mask_to_polygons(mask)
    np.testing.assert_array_equal(polygons_to_mask(polygons, mask.shape), mask)


def test_square_outline_is_its_voxels_outline():
    """A 3x3 block at rows 1..3: its outline is the square from corner (0.5, 0.5) to (3.5, 3.5)."""
    polygons = mask_to_polygons(_slice(SLICES["square"]))
    assert len(polygons) == 1
    assert sorted(map(tuple, polygons[0].tolist())) == [(0.5, 0.5), (0.5, 3.5), (3.5, 0.5), (3.5, 3.5)]


def test_ring_has_an_inner_outline_and_pieces_have_their_own():
    assert len(mask_to_polygons(_slice(SLICES["ring-with-hole"]))) == 3  # outer, hole, voxel in the hole
    assert len(mask_to_polygons(_slice(SLICES["two-pieces"]))) == 2
    assert len(mask_to_polygons(_slice(SLICES["diagonal-touching"]))) == 4  # corners do not join pieces


def _area(polygon: np.ndarray) -> float:
    i, j = polygon[:, 0], polygon[:, 1]
    return abs(float(np.dot(i, np.roll(j, 1)) - np.dot(j, np.roll(i, 1)))) / 2


def test_edge_contour_keeps_the_area_a_centre_contour_loses():
    """Why edges: a planning system's area (or volume) of a contour through the boundary voxels' centres
    is 4 voxels for a 3x3 square; on the voxel edges it is 9, as marching squares alone (8.5) is not."""
    centre_square = np.array([[1.0, 1.0], [1.0, 3.0], [3.0, 3.0], [3.0, 1.0]])
    (edges,) = mask_to_polygons(_slice(SLICES["square"]))
    assert _area(centre_square) == 4.0 and _area(edges) == 9.0


@pytest.mark.parametrize("name", SLICES)
def test_outlines_enclose_exactly_the_voxels(name):
    """Every vertex is a voxel corner, and outer areas less hole areas give the voxel count."""
    mask = _slice(SLICES[name])
    polygons = mask_to_polygons(mask)
    assert all(np.all(p % 1 == 0.5) for p in polygons)
    inside = [polygons_to_mask([p], mask.shape) for p in polygons]
    depth = [sum(np.array_equal(a & b, a) for b in inside if b is not a) for a in inside]  # polygons around it
    assert sum(_area(p) * (-1) ** d for p, d in zip(polygons, depth)) == mask.sum()


def test_empty_slice_and_degenerate_polygons():
    assert mask_to_polygons(np.zeros((4, 4), bool)) == []
    assert not polygons_to_mask([np.array([[1.0, 1.0], [2.0, 2.0]])], (4, 4)).any()  # a line holds no centre
    full = polygons_to_mask([np.array([[-5.0, -5.0], [-5.0, 9.0], [9.0, 9.0], [9.0, -5.0]])], (4, 4))
    assert full.all()  # clipped to the slice
