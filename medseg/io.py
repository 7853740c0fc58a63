"""Reading scans and writing masks with their exact geometry.

SimpleITK does the file work: it reads NIfTI, NRRD, MHA/MHD and DICOM series, and writes a uint8 mask
5-10x faster than nibabel. Arrays in medseg are indexed (X, Y, Z) = (i, j, k), the voxel order of the
file, as in nibabel and TorchIO; the physical placement of those voxels is a `Grid`.

Every write goes to a temporary file in the target folder and is renamed into place, so a crash or a
Ctrl-C never leaves a partial file where a result is expected. Inputs are opened read-only.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg.errors import InputError
from medseg.planar import PLANAR_SUFFIXES, channels, flatten, lift

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once at import: os.umask can only be read by setting it

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", *PLANAR_SUFFIXES)


@dataclass(frozen=True)
class Grid:
    """Where a voxel array sits in the world: the ITK/LPS convention, as SimpleITK reports it."""

    shape: tuple[int, int, int]  # voxels along i, j, k
    spacing: tuple[float, float, float]  # mm
    origin: tuple[float, float, float]  # mm, LPS world position of voxel (0, 0, 0)
    direction: tuple[float, ...]  # 3x3 row-major: column c is the world direction of voxel axis c

    @classmethod
    def of(cls, image: sitk.Image) -> Grid:
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    @property
    def affine(self) -> np.ndarray:
        """4x4 voxel index -> LPS world (mm)."""
        matrix = np.eye(4)
        matrix[:3, :3] = np.reshape(self.direction, (3, 3)) * np.asarray(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    @property
    def ras_affine(self) -> np.ndarray:
        """4x4 voxel index -> RAS world (mm): the NIfTI/nibabel/TorchIO convention."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def crop(self, box: Sequence[slice]) -> Grid:
        """The grid of `array[box]` (slices with start and stop, no step): same voxels, fewer of them."""
        corner = self.affine @ np.array([s.start for s in box] + [1.0])
        return Grid(tuple(int(s.stop - s.start) for s in box), self.spacing, tuple(corner[:3].tolist()),
                    self.direction)

    def matches(self, other: Grid, tolerance: float = 1e-4) -> bool:
        """Same voxels in the same place (spacing/origin relative to the voxel size)."""
        if self.shape != other.shape:
            return False
        scale = max(min(self.spacing), 1e-6)
        return (np.allclose(self.spacing, other.spacing, rtol=tolerance, atol=tolerance * scale)
                and np.allclose(self.origin, other.origin, atol=tolerance * 10 * scale)
                and np.allclose(self.direction, other.direction, atol=tolerance))

    def difference(self, other: Grid) -> str:
        """What differs from `other`, in words (empty if the grids match)."""
        if self.matches(other):
            return ""
        parts = []
        if self.shape != other.shape:
            parts.append(f"shape {'x'.join(map(str, self.shape))} vs {'x'.join(map(str, other.shape))}")
        fmt = lambda values: "(" + ", ".join(f"{v:.4g}" for v in values) + ")"  # noqa: E731
        if not np.allclose(self.spacing, other.spacing, rtol=1e-4, atol=1e-5):
            parts.append(f"spacing {fmt(self.spacing)} vs {fmt(other.spacing)} mm")
        if not np.allclose(self.origin, other.origin, atol=1e-3 * max(min(self.spacing), 1e-6)):
            parts.append(f"origin {fmt(self.origin)} vs {fmt(other.origin)} mm")
        if not np.allclose(self.direction, other.direction, atol=1e-4):
            parts.append(f"direction {fmt(self.direction)} vs {fmt(other.direction)}")
        return "; ".join(parts) or "grids differ beyond tolerance"

    def describe(self) -> str:
        spacing = "x".join(f"{s:.3g}" for s in self.spacing)
        return f"{'x'.join(map(str, self.shape))} voxels at {spacing} mm, orientation {orientation_code(self)}"


def orientation_code(grid: Grid) -> str:
    """Anatomical direction each voxel axis points to, e.g. 'LPS' or 'RAS' (ITK letters are 'to')."""
    direction = np.reshape(grid.direction, (3, 3))
    letters = ("L", "P", "S"), ("R", "A", "I")
    code = ""
    for axis in range(3):
        column = direction[:, axis]
        world = int(np.argmax(np.abs(column)))
        code += letters[0][world] if column[world] > 0 else letters[1][world]
    return code


def case_name(path: str | Path) -> str:
    """File name without its image suffix: `case_001.nii.gz` -> `case_001`; a folder keeps its name."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_image_path(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_SUFFIXES)


# ------------------------------------------------------------------------------------------ read


def _check_nifti(path: Path) -> None:
    """Catch what ITK's NIfTI reader lets through: truncated data and NaN/inf voxels.

    ITK fills the missing part of a truncated NIfTI with zeros instead of failing (NRRD and MHA do
    fail), and its NIfTI library silently reads NaN/inf floats as 0. Float data is therefore read a
    second time with nibabel to count them; integer data cannot hold NaN, and its completeness is
    confirmed from the gzip trailer (the uncompressed size, mod 2**32) without decompressing again.
    """
    import nibabel

    try:
        data = nibabel.load(path).dataobj  # reads the header only
        expected = int(data.offset) + int(np.prod(data.shape)) * np.dtype(data.dtype).itemsize
    except (OSError, ValueError, EOFError, nibabel.filebasedimages.ImageFileError):
        return  # ITK read it but nibabel cannot parse the header: nothing to compare against
    truncated = InputError(f"{path}: file is truncated or corrupt (its header promises {expected} bytes of "
                           "header and voxels, the file holds fewer)")
    if np.dtype(data.dtype).kind in "fc":
        try:
            values = data.get_unscaled()
        except (EOFError, OSError, ValueError, zlib.error):
            raise truncated from None
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        if bad:
            raise InputError(f"{path}: image has {bad} NaN/inf voxels")
        return
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as handle:
            handle.seek(-4, os.SEEK_END)
            if int.from_bytes(handle.read(4), "little") == expected % 2**32:
                return
        found = 0
        try:
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(1 << 22):
                    found += len(chunk)
        except (EOFError, OSError, zlib.error):
            raise truncated from None  # the compressed stream ends early or is damaged
    else:
        found = path.stat().st_size
    if found < expected:
        raise truncated


def read_sitk(path: str | Path, series_uid: str | None = None, dimensions: int | None = 3) -> sitk.Image:
    """One image file or DICOM folder as a 3D SimpleITK image, or an `InputError`.

    A DICOM folder must hold one image series, or `series_uid` chooses one; its slices must be evenly
    spaced along their normal (`medseg.dicom.series` checks, nothing is resampled). `dimensions` is the
    task's: 3 wants a 3D scalar image of two slices or more; 2 a 2D image (PNG, TIFF, 2D NIfTI/MHA), held
    as (X, Y, 1), whose pixels may be vectors (RGB: `medseg.planar`); None takes either.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        from medseg.dicom.series import read_ct_series

        image = read_ct_series(path, series_uid)
    elif series_uid is not None:
        raise InputError(f"{path}: a series UID chooses a series in a DICOM folder; this is a file")
    else:
        if path.stat().st_size == 0:
            raise InputError(f"{path}: file is empty")
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError:
            raise InputError(f"{path}: not a readable image (truncated, corrupt or not NIfTI/NRRD/MHA/DICOM)") from None
        if path.name.lower().endswith((".nii", ".nii.gz")):
            _check_nifti(path)
    image = lift(image, path, dimensions)
    if image.GetSize()[2] > 1 and min(image.GetSize()) < 2:
        raise InputError(f"{path}: expected a 3D image, got size {image.GetSize()} (a 2D slice)")
    return image


def to_array(image: sitk.Image, dtype: type | None = None, copy: bool = True) -> np.ndarray:
    """Voxel array indexed (X, Y, Z) like the file; SimpleITK's own arrays are (Z, Y, X).

    `copy=False` (with `dtype` None or the image's own) gives a read-only view of the image's voxels
    that keeps the image alive, and that `from_array` turns back into the image without a copy: a
    512 x 512 x 200 CT is 100 MB, and copying it out and back in cost 0.1 s per scan.
    """
    view = np.asarray(_VoxelBuffer(image)).transpose(2, 1, 0)
    if not copy and (dtype is None or np.dtype(dtype) == view.dtype):
        return view
    return np.array(view, dtype=dtype or view.dtype, copy=True)


class _VoxelBuffer:
    """A SimpleITK image's voxels for numpy (`np.asarray`); as the array's base it keeps the image alive.

    SimpleITK's own `GetArrayViewFromImage` does not keep the image alive: the view dangles once the
    image is gone.
    """

    def __init__(self, image: sitk.Image):
        self.image = image
        self.__array_interface__ = sitk.GetArrayViewFromImage(image).__array_interface__


def _viewed_image(array: np.ndarray, grid: Grid) -> sitk.Image | None:
    """The SimpleITK image whose voxels `array` is, exactly and whole, as `to_array(copy=False)` gives them."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if not isinstance(base, _VoxelBuffer) or Grid.of(base.image) != grid:
        return None
    whole = np.asarray(base).transpose(2, 1, 0)
    same = (array.__array_interface__["data"][0] == whole.__array_interface__["data"][0]
            and array.shape == whole.shape and array.strides == whole.strides and array.dtype == whole.dtype)
    return base.image if same else None


def read_image(paths: str | Path | Sequence[str | Path], dtype: type | None = np.float32,
               series_uid: str | None = None, dimensions: int | None = 3) -> tuple[np.ndarray, Grid]:
    """A scan as (C, X, Y, Z) plus its grid; several files (e.g. T2 + ADC) become channels, and so do the
    components of a 2D colour image (RGB: 3 channels; `dimensions` as for `read_sitk`, 2D is (C, X, Y, 1)).

    `dtype` None keeps the file's voxel type: a CT's int16 is half the memory of float32; a
    one-channel scan is then a read-only view of the file's voxels (no copy; see `to_array`).

    `series_uid` chooses the series of a DICOM folder holding several (see `read_sitk`).

    Raises `InputError` for unreadable files, non-3D images, channels on different grids and
    NaN/inf voxels.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise InputError("no image given")
    found, grid = [], None
    for path in paths:
        image = read_sitk(path, series_uid, dimensions)
        this = Grid.of(image)
        if grid is not None and not grid.matches(this):
            raise InputError(f"{path}: channel grid ({this.describe()}) differs from {paths[0]} ({grid.describe()})")
        if image.GetNumberOfComponentsPerPixel() > 1:  # a 2D colour image
            arrays = [a.astype(dtype or a.dtype, copy=False) for a in channels(image, path)]
        else:
            arrays = [to_array(image, dtype, copy=len(paths) > 1 or dtype is not None)]  # else a view, no copy
        for array in arrays:
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise InputError(f"{path}: image has {int((~np.isfinite(array)).sum())} NaN/inf voxels")
        found += arrays
        grid = grid or this
    return (np.stack(found) if len(found) > 1 else found[0][None]), grid  # one channel: no copy


def read_label(path: str | Path, dimensions: int | None = 3) -> tuple[np.ndarray, Grid]:
    """A label map as uint8 (X, Y, Z) plus its grid (2D: (X, Y, 1), `dimensions` as for `read_sitk`);
    non-integer or out-of-range values and colour pixels are errors."""
    image = read_sitk(path, dimensions=dimensions)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: a label map needs one value per pixel, got {image.GetNumberOfComponentsPerPixel()} "
                         "(a colour image)")
    array = to_array(image)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise InputError(f"{path}: label map has NaN/inf voxels")
        if not np.array_equal(array, np.round(array)):
            raise InputError(f"{path}: label map has non-integer values")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise InputError(f"{path}: label values must be within 0..255, got {array.min()}..{array.max()}")
    return array.astype(np.uint8), Grid.of(image)


# ----------------------------------------------------------------------------------------- write


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds."""
    path = Path(path)
    folder = path.parent
    if not folder.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InputError(f"cannot create output folder {folder}: {error.strerror or error}") from None
    suffix = next((s for s in IMAGE_SUFFIXES if path.name.lower().endswith(s)), path.suffix)
    try:
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=folder)
    except OSError as error:
        raise InputError(f"cannot write to {folder}: {error.strerror or error}") from None
    os.close(handle)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results should read like any other file
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a new hidden folder beside `path` to fill; it becomes `path` only if the block succeeds.

    `path` must be absent or an empty folder (checked before and after), so a folder of results is
    either complete or not there, and nothing already there is mixed in or overwritten.
    """
    import secrets
    import shutil

    path = Path(path)
    refuse = InputError(f"{path}: already exists and is not an empty folder; choose a new output folder")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise refuse
    building = path.parent / f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        building.mkdir(parents=True)  # its mode follows the umask, like any other output
    except OSError as error:
        raise InputError(f"cannot create {path}: {error.strerror or error}") from None
    try:
        yield building
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise refuse
        if path.exists():
            path.rmdir()
        os.replace(building, path)
    finally:
        shutil.rmtree(building, ignore_errors=True)


def write_text(text: str, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")  # the page and tables carry mm², whatever the locale
    return Path(path)


def write_sitk(image: sitk.Image, path: str | Path, keep_3d: bool = False) -> Path:
    """Write atomically; an image of one slice as the 2D image it stands for (`medseg.planar.flatten`)
    unless `keep_3d` (3D Slicer holds a 2D image as a volume of one slice)."""
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image if keep_3d else flatten(image), str(tmp), useCompression=True)
        except RuntimeError as error:
            raise InputError(f"cannot write {path}: {str(error).strip().splitlines()[-1]}") from None
    return Path(path)


def from_array(array: np.ndarray, grid: Grid) -> sitk.Image:
    """SimpleITK image of an (X, Y, Z) array placed on `grid`."""
    if tuple(array.shape) != grid.shape:
        raise ValueError(f"array of shape {array.shape} does not fit a grid of shape {grid.shape}")
    image = _viewed_image(array, grid)  # a scan as `read_image` gave it: the image it views, no copy
    if image is not None:
        return image
    return grid.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0))))


def write_label_map(labels: np.ndarray, grid: Grid, path: str | Path) -> Path:
    """Write a uint8 (X, Y, Z) label map on exactly `grid` (NIfTI gets qform and sform, codes 1)."""
    if labels.dtype != np.uint8 and (labels.min(initial=0) < 0 or labels.max(initial=0) > 255):
        raise ValueError("label values must be within 0..255")
    return write_sitk(from_array(labels.astype(np.uint8, copy=False), grid), path)


def write_image(array: np.ndarray, grid: Grid, path: str | Path) -> Path:
    """Write a scalar (X, Y, Z) image (e.g. a probability map) on exactly `grid`."""
    return write_sitk(from_array(array, grid), path)
