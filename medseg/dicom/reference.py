"""What a DICOM output refers to: the organs it names, and the CT slices its voxels lie on.

An RTSTRUCT and a DICOM-SEG must each point at every source image by UID, and place each voxel slice
on the CT file at that position. Files are put in slice order by their position along the slice normal
(as SimpleITK/GDCM sort a series, so slice k here is voxel slice k of `medseg.io.read_image`), never by
file name or list order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.dicom import require
from medseg.errors import InputError
from medseg.io import Grid


@dataclass(frozen=True)
class Structure:
    """One organ as a DICOM object names it."""

    number: int  # label value in the mask (and ROI number in an RTSTRUCT)
    name: str  # structure name a planning system shows: the TG-263 name where the task gives one
    color: tuple[int, int, int] = (255, 0, 0)  # RGB display colour
    label: str = ""  # the task's organ name, kept as the segment description


def structures_of(task) -> list[Structure]:
    """The task's labels as structures, named by TG-263 where the task gives the name."""
    return [Structure(label.id, getattr(label, "tg263", None) or label.name, tuple(label.color), label.name)
            for label in task.labels]


@dataclass(frozen=True)
class CtSlice:
    """One CT file's place in the series (headers only; pixel data is not read)."""

    path: Path
    dataset: object  # pydicom Dataset without pixel data
    position: np.ndarray  # ImagePositionPatient: LPS mm of the centre of the first transmitted pixel
    row_axis: np.ndarray  # world step (mm) from one column to the next: IOP[0:3] * column spacing
    column_axis: np.ndarray  # world step (mm) from one row to the next: IOP[3:6] * row spacing

    def to_world(self, ij: np.ndarray) -> np.ndarray:
        """(N, 2) voxel coordinates (i = column, j = row) -> (N, 3) LPS mm on this slice's plane."""
        return self.position + ij[:, :1] * self.row_axis + ij[:, 1:2] * self.column_axis


def _slice(pydicom, path: Path) -> CtSlice:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
        position = np.asarray(ds.ImagePositionPatient, dtype=float)
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
        _ = ds.SOPInstanceUID, ds.SOPClassUID, ds.FrameOfReferenceUID, ds.Rows, ds.Columns
    except (OSError, AttributeError, ValueError, TypeError, pydicom.errors.InvalidDicomError) as error:
        raise InputError(f"{path}: not a CT slice with a position, orientation and spacing ({error})") from None
    if orientation.shape != (6,) or position.shape != (3,):
        raise InputError(f"{path}: ImageOrientationPatient/ImagePositionPatient have the wrong number of values")
    return CtSlice(Path(path), ds, position, orientation[:3] * column_spacing, orientation[3:] * row_spacing)


def ordered_slices(ct_files: list[Path], shape: tuple[int, int, int] | None = None) -> list[CtSlice]:
    """The series' slices in voxel-slice order (ascending position along the normal row x column).

    Args:
        ct_files: every file of one CT series, in any order.
        shape: (X, Y, Z) of the mask to be placed on them; checked against Columns, Rows and the file count.
    """
    pydicom = require("pydicom", "writing DICOM outputs")
    if not ct_files:
        raise InputError("no CT files given to refer to")
    slices = [_slice(pydicom, Path(p)) for p in ct_files]
    first = slices[0]
    normal = np.cross(first.row_axis, first.column_axis)
    normal /= np.linalg.norm(normal)
    for s in slices[1:]:
        same = (s.dataset.Rows, s.dataset.Columns) == (first.dataset.Rows, first.dataset.Columns)
        if not same or not np.allclose([s.row_axis, s.column_axis], [first.row_axis, first.column_axis], atol=1e-4):
            raise InputError(f"{s.path}: orientation, spacing or size differs from {first.path}: not one series")
    slices.sort(key=lambda s: float(s.position @ normal))
    heights = np.array([s.position @ normal for s in slices])
    if len(slices) > 1 and np.min(np.diff(heights)) < 1e-3:
        raise InputError(f"{first.path.parent}: two CT files lie at the same slice position")
    if shape is not None:
        found = (int(first.dataset.Columns), int(first.dataset.Rows), len(slices))
        if tuple(shape) != found:
            raise InputError(f"{first.path.parent}: the mask is {'x'.join(map(str, shape))} voxels but the CT "
                             f"series is {'x'.join(map(str, found))} (columns x rows x slices)")
    return slices


def check_on_grid(slices: list[CtSlice], grid: Grid) -> None:
    """The slices must lie where the mask's grid puts its voxel slices: same series, same slice order."""
    corners = grid.affine @ np.array([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, grid.shape[2] - 1.0, 1.0]]).T
    found = np.array([slices[0].position, slices[-1].position, slices[0].row_axis, slices[0].column_axis])
    expected = np.array([corners[:3, 0], corners[:3, 1], grid.affine[:3, 0], grid.affine[:3, 1]])
    if len(slices) != grid.shape[2] or not np.allclose(found, expected, atol=0.05 * min(grid.spacing)):
        raise InputError(f"{slices[0].path.parent}: the CT slices do not lie on the mask's grid "
                         f"({grid.describe()}); the mask was made from another series")


def organs_on_series(labels: np.ndarray, ct_files, structures, grid: Grid | None, path, what: str):
    """The CT slices in position order and the organs present in `labels`, with their boxes (one pass).

    Both DICOM writers start here: the mask must fit the series (and `grid`, if known), and a mask
    with no organ has nothing to write (`what` names the object in the error).
    """
    from medseg.geometry import label_boxes

    slices = ordered_slices(list(ct_files), labels.shape)
    if grid is not None:
        check_on_grid(slices, grid)
    boxes = label_boxes(labels, 255)
    present = [s for s in structures if 1 <= s.number <= 255 and boxes[s.number - 1] is not None]
    if not present:
        raise InputError(f"{path}: no organ was segmented, so there is no {what} to write")
    return slices, present, boxes
