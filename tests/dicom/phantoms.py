"""Phantoms for the DICOM tests: grids head first, feet first or with rows along x, organs placed in mm.

A plain module, not a conftest: a second conftest.py would shadow tests/conftest.py for the many test
modules that import helpers from it (`from conftest import blob_case`). The `ct_series` fixture that
writes a series lives in tests/conftest.py.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from medseg.io import Grid

# Direction matrices (ITK: column c is the world direction of voxel axis c); the third column is
# row x column, as DICOM readers build it from ImageOrientationPatient.
HEAD_FIRST = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
FEET_FIRST = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
ROWS_ALONG_X = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # image columns run A-P, rows L-R
FIELD_MM = (96.0, 80.0, 48.0)  # extent of the phantom grids along x, y, z


def phantom_grid(direction=HEAD_FIRST, in_plane: float = 0.8, slice_mm: float = 2.0,
                 centre=(3.3, -120.7, 500.2)) -> Grid:
    """A grid covering FIELD_MM around `centre` (LPS mm) in the given orientation and spacing."""
    d = np.reshape(direction, (3, 3))
    spacing = np.array([in_plane, in_plane, slice_mm])
    world_extent = np.abs(d.T) @ np.array(FIELD_MM)  # extent along each voxel axis
    shape = np.round(world_extent / spacing).astype(int)
    origin = np.asarray(centre) - d @ ((shape - 1) * spacing / 2)
    return Grid(tuple(int(n) for n in shape), tuple(spacing.tolist()), tuple(origin.tolist()), tuple(direction))


def world_of(grid: Grid) -> np.ndarray:
    """(X, Y, Z, 3) LPS mm of every voxel centre, relative to the grid's centre."""
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in grid.shape], indexing="ij"), -1)
    world = index @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    return world - world.reshape(-1, 3).mean(0)


def phantom_organs(grid: Grid) -> np.ndarray:
    """(X, Y, Z) uint8: 1 sphere, 2 ellipsoid, 3 ring with a hole in every slice, 4 two spheres side by side.

    Each organ holds more than 5 mL; organ 4's pieces lie in the same slices, 1 mm apart at the closest.
    """
    w = world_of(grid)
    x, y, z = w[..., 0], w[..., 1], w[..., 2]
    labels = np.zeros(grid.shape, np.uint8)
    labels[(x + 22) ** 2 + (y + 18) ** 2 + z**2 <= 11.0**2] = 1
    labels[((x - 22) / 14) ** 2 + ((y + 18) / 9) ** 2 + (z / 10) ** 2 <= 1] = 2
    radius = np.hypot(x + 22, y - 18)
    labels[(radius <= 12) & (radius >= 5) & (np.abs(z) <= 8)] = 3
    for cx in (13.0, 31.0):
        labels[(x - cx) ** 2 + (y - 18) ** 2 + z**2 <= 8.5**2] = 4
    return labels


def ct_of(labels: np.ndarray, grid: Grid) -> sitk.Image:
    """A CT-like image of the organs: soft tissue around them, each organ its own HU."""
    hu = np.array([0, 40, 10, -20, 700], np.int16)[labels]
    return grid.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(hu.transpose(2, 1, 0))))
