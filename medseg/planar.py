"""2D images inside medseg: a 2D file is a volume of one slice, (X, Y, 1), as TorchIO holds them.

A PNG, TIFF, 2D NIfTI or 2D MHA is read (`medseg.io.read_sitk`) into a 3D SimpleITK image of size
(X, Y, 1): the in-plane spacing, origin and direction are the file's, the third axis gets 1 mm, origin
0 and the world z direction (`sitk.JoinSeries`). Grids, sampling queues, sliding windows and
resampling then need no 2D branch, and an image on such a grid goes back to disk as the 2D image it
came from (`flatten`, in `medseg.io.write_sitk`). RGB(A) pixels become channels, alpha dropped.

A 3D task refuses a 2D image and a 2D task a 3D one, so within one task "one slice" means 2D; a 3D
file of one slice counts as 2D (and is written back as a 2D file).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg.errors import InputError

PLANAR_SUFFIXES = (".png", ".tif", ".tiff")  # 2D-only formats (2D NIfTI and MHA use the 3D suffixes)


def is_planar(shape: Sequence[int]) -> bool:
    """Whether an (X, Y, Z) shape is a 2D image held as one slice."""
    return len(shape) == 3 and shape[2] == 1


def png_holds(grid) -> bool:
    """Whether a PNG keeps a 2D `medseg.io.Grid` whole: PNG stores a pixel size but no origin or direction,
    so only an image at origin 0 with unrotated axes (every PNG and TIFF read) survives the round trip."""
    return (is_planar(grid.shape) and np.allclose(grid.origin, 0)
            and np.allclose(np.reshape(grid.direction, (3, 3)), np.eye(3)))


def lift(image: sitk.Image, path: Path, dimensions: int | None) -> sitk.Image:
    """A file's image as medseg holds it: 3D, a 2D image as (X, Y, 1); vector pixels only in 2D.

    Args:
        dimensions: the task's (2 or 3); None accepts either (comparing two files of any kind).
    Raises:
        InputError: one line naming the file: a 2D image where 3D is expected or the reverse, 4D and up,
            a 3D image with several values per voxel.
    """
    found, size = image.GetDimension(), image.GetSize()
    if found not in (2, 3):
        raise InputError(f"{path}: expected a {dimensions or 3}D image, got a {found}D image of size {size}")
    planar = found == 2 or size[2] == 1
    if dimensions == 3 and planar:
        raise InputError(f"{path}: expected a 3D image, got a 2D image of size {size} "
                         "(a task for 2D images says `dimensions: 2`)")
    if dimensions == 2 and not planar:
        raise InputError(f"{path}: expected a 2D image (the task has `dimensions: 2`), got a 3D image of size {size}")
    if image.GetNumberOfComponentsPerPixel() != 1 and not planar:
        raise InputError(f"{path}: expected one value per voxel, got {image.GetNumberOfComponentsPerPixel()} "
                         "(a 4D or vector image; give each channel as its own file)")
    return sitk.JoinSeries(image) if found == 2 else image


def channels(image: sitk.Image, path: Path) -> list[np.ndarray]:
    """The (X, Y, 1) channels of a lifted vector image: RGB as 3, a PNG's alpha (RGBA, grey + alpha) dropped."""
    count = image.GetNumberOfComponentsPerPixel()
    keep = count - 1 if str(path).lower().endswith(".png") and count in (2, 4) else count
    voxels = sitk.GetArrayFromImage(image)  # (Z, Y, X, C)
    return [np.ascontiguousarray(voxels[..., c].transpose(2, 1, 0)) for c in range(keep)]


def flatten(image: sitk.Image) -> sitk.Image:
    """A one-slice 3D image as the 2D image it stands for (spacing, origin, direction in-plane); others as they are."""
    if image.GetDimension() != 3 or image.GetSize()[2] != 1:
        return image
    x, y, _ = image.GetSize()
    return sitk.Extract(image, [x, y, 0], [0, 0, 0], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
