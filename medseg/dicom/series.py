"""Reading a DICOM image series with its true geometry, or a one-line reason why not.

ITK's series reader takes the slice spacing from the first two slices and the slice direction from
the image orientation, so a missing slice, uneven spacing or a gantry tilt gives a volume whose
geometry is silently wrong (ITK only warns on stderr), and a folder holding two series gives whichever
GDCM picks. Here the headers are read first (SimpleITK only: no optional package needed) and checked:

- one image series per folder, or the one chosen by UID (`--series`); RTSTRUCT, SEG, RTPLAN and other
  non-image objects beside the slices are ignored, and so are images without a position (screen captures);
- every slice shares one orientation and size; slices lie along the normal of that orientation (no
  gantry tilt), evenly spaced within 1% of the spacing or 0.01 mm (no missing slice, nothing resampled);
- a CT series is axial: its slice normal lies within 45 degrees of the head-foot axis (an oblique axial
  series is read with its exact geometry; a sagittal or coronal reformat is refused). Other modalities
  (MR) may lie in any plane.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg.errors import InputError

NOT_IMAGES = {"RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "RTIMAGE", "SEG", "SR", "PR", "REG", "KO", "DOC"}
SPACING_TOLERANCE = 0.01  # relative to the slice spacing ...
MIN_TOLERANCE_MM = 0.01  # ... or this, whichever is larger
TILT_TOLERANCE_MM = 0.05  # sideways drift of any slice from the first one's normal (rounded positions pass)
MAX_AXIAL_ANGLE = 45.0  # degrees between a CT's slice normal and the head-foot axis


@dataclass(frozen=True)
class SliceHeader:
    """What one file says about where its pixels are (read by SimpleITK without the pixels)."""

    path: Path
    position: np.ndarray  # (3,) LPS mm: ImagePositionPatient, centre of the first pixel
    orientation: np.ndarray  # (6,) ImageOrientationPatient: row direction, then column direction
    size: tuple[int, ...]  # (columns, rows, frames)
    modality: str
    series_uid: str
    description: str


@dataclass(frozen=True)
class Series:
    """One image series of a folder: its UID, description and files (in no particular order)."""

    uid: str
    description: str
    files: tuple[Path, ...]

    def describe(self) -> str:
        text = f' "{self.description}"' if self.description else ""
        return f"{self.uid}{text} ({len(self.files)} slice{'s' if len(self.files) != 1 else ''})"


def _numbers(reader: sitk.ImageFileReader, tag: str, count: int) -> np.ndarray | None:
    if not reader.HasMetaDataKey(tag):
        return None
    try:
        values = np.array([float(v) for v in reader.GetMetaData(tag).strip().split("\\")])
    except ValueError:
        return None
    return values if values.shape == (count,) and np.isfinite(values).all() else None


def read_header(path: str | Path) -> SliceHeader | None:
    """The geometry tags of one DICOM image file; None if it is not an image SimpleITK can read."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    text = {tag: reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""
            for tag in ("0008|0060", "0020|000e", "0008|103e")}
    position, orientation = _numbers(reader, "0020|0032", 3), _numbers(reader, "0020|0037", 6)
    if position is None or orientation is None:
        raise InputError(f"{path}: DICOM image without a valid Image Position/Orientation (Patient); "
                         "its place in the patient is unknown")
    return SliceHeader(Path(path), position, orientation, tuple(reader.GetSize()), text["0008|0060"].upper(),
                       text["0020|000e"], text["0008|103e"])


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """Without ITK's raw 'No Series were found' warning on stderr: our own message says it in one line."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def list_series(folder: str | Path) -> list[Series]:
    """The image series directly in `folder` (not its subfolders); non-image objects left out."""
    found = []
    with _quiet_itk():
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    for uid in uids:
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        try:
            first = read_header(files[0]) if files else None
        except InputError:  # no place in the patient: a screen capture or report, not a scan
            continue
        if first is None or first.modality in NOT_IMAGES:
            continue
        found.append(Series(uid, first.description, tuple(Path(f) for f in files)))
    return found


def choose_series(folder: str | Path, series_uid: str | None = None) -> Series:
    """The folder's one image series, or the one with `series_uid`; an `InputError` names the others."""
    folder = Path(folder)
    found = list_series(folder)
    if not found:
        inside = sorted(p.name for p in folder.iterdir() if p.is_dir() and list_series(p))
        hint = (f"; its subfolder {inside[0]} does: give that folder" if len(inside) == 1 else
                f"; its subfolders {', '.join(inside[:3])} do: give one of those" if inside else "")
        raise InputError(f"{folder}: folder holds no DICOM series (and is not an image file){hint}")
    listing = ", ".join(s.describe() for s in found)
    if series_uid is not None:
        chosen = [s for s in found if s.uid == series_uid.strip()]
        if not chosen:
            raise InputError(f"{folder}: no image series with UID {series_uid}; the folder holds {listing}")
        return chosen[0]
    if len(found) > 1:
        raise InputError(f"{folder}: holds {len(found)} image series, choose one with --series UID: {listing}")
    return found[0]


def _normal(orientation: np.ndarray) -> np.ndarray:
    normal = np.cross(orientation[:3], orientation[3:])
    return normal / max(float(np.linalg.norm(normal)), 1e-12)


def _check_same_plane(slices: Sequence[SliceHeader], where: str) -> None:
    first = slices[0]
    for other in slices[1:]:
        if not np.allclose(other.orientation, first.orientation, atol=1e-4):
            raise InputError(f"{where}: slices have different orientations ({other.path.name} and "
                             f"{first.path.name}): not one stack of slices (a scout or reformat in the series?)")
        if other.size != first.size:
            raise InputError(f"{where}: slices have different sizes ({other.path.name}: {other.size[:2]}, "
                             f"{first.path.name}: {first.size[:2]})")


def _check_axial(normal: np.ndarray, modality: str, where: str) -> None:
    angle = float(np.degrees(np.arccos(min(1.0, abs(float(normal[2]))))))
    if modality == "CT" and angle > MAX_AXIAL_ANGLE:
        plane = "sagittal" if abs(normal[0]) >= abs(normal[1]) else "coronal"
        raise InputError(f"{where}: a {plane} CT series (slice normal {angle:.0f} degrees from the head-foot "
                         "axis); medseg reads axial CT series: give the axial series")


def _check_tilt(offsets: np.ndarray, heights: np.ndarray, tolerance: float, where: str) -> None:
    """Slices must lie along the normal: a sideways drift is a gantry tilt (or a sheared series)."""
    sideways = np.linalg.norm(offsets, axis=1)
    worst = int(np.argmax(sideways))
    if sideways[worst] > tolerance:
        span = abs(float(heights[worst] - heights[0]))
        angle = float(np.degrees(np.arctan2(sideways[worst], span)))
        raise InputError(f"{where}: slices shift {sideways[worst]:.2f} mm sideways over {span:.1f} mm, a gantry "
                         f"tilt of {angle:.1f} degrees; medseg reads untilted series only: reconstruct the scan "
                         "without tilt or resample it first")


def _check_spacing(slices: Sequence[SliceHeader], heights: np.ndarray, where: str) -> float:
    """The even slice spacing (mm), or an error naming the first gap that breaks it."""
    gaps = np.diff(heights)
    spacing = float(np.median(gaps))
    tolerance = max(SPACING_TOLERANCE * spacing, MIN_TOLERANCE_MM)
    z = [float(s.position[2]) for s in slices]
    same = np.flatnonzero(gaps <= MIN_TOLERANCE_MM)
    if same.size:
        i = int(same[0])
        raise InputError(f"{where}: two slices at z={z[i]:.2f} mm ({slices[i].path.name}, {slices[i + 1].path.name}):"
                         " the folder holds a slice twice or two stacks in one series")
    bad = np.flatnonzero(np.abs(gaps - spacing) > tolerance)
    if not bad.size:
        return spacing
    i = int(bad[0])
    more = f" (and {bad.size - 1} more uneven gap{'s' if bad.size > 2 else ''})" if bad.size > 1 else ""
    missing = round(gaps[i] / spacing) - 1
    if missing >= 1 and abs(gaps[i] - (missing + 1) * spacing) <= tolerance * (missing + 1):
        what = "a slice is missing" if missing == 1 else f"{missing} slices are missing"
    else:
        what = "uneven slice spacing; medseg does not resample it"
    raise InputError(f"{where}: slices at z={z[i]:.2f} and z={z[i + 1]:.2f} mm are {gaps[i]:.2f} mm apart, the "
                     f"series' spacing is {spacing:.2f} mm: {what}{more}")


def slice_order(headers: Sequence[SliceHeader], where: str) -> list[SliceHeader]:
    """The slices sorted along their normal (as GDCM sorts them), after every geometry check."""
    slices = list(headers)
    if len(slices) == 1 and len(slices[0].size) == 3 and slices[0].size[2] > 1:
        return slices  # one multi-frame file: its frames are one volume
    if len(slices) < 2:
        raise InputError(f"{where}: the DICOM series has a single slice; a 3D scan needs several")
    _check_same_plane(slices, where)
    normal = _normal(slices[0].orientation)
    _check_axial(normal, slices[0].modality, where)
    slices.sort(key=lambda s: float(s.position @ normal))
    relative = np.array([s.position - slices[0].position for s in slices])
    heights = relative @ normal
    _check_spacing(slices, heights, where)
    _check_tilt(relative - np.outer(heights, normal), heights, TILT_TOLERANCE_MM, where)
    return slices


def series_files(folder: str | Path, series_uid: str | None = None) -> list[Path]:
    """The files of the folder's (chosen) image series in voxel-slice order, its geometry checked."""
    series = choose_series(folder, series_uid)
    return ordered_files(series.files, str(folder))


def ordered_files(files: Sequence[str | Path], where: str) -> list[Path]:
    """Files of one series (any order, any folders) in voxel-slice order, its geometry checked."""
    headers = []
    for path in files:
        header = read_header(path)
        if header is None:
            raise InputError(f"{path}: not a DICOM image SimpleITK can read")
        headers.append(header)
    return [s.path for s in slice_order(headers, where)]


def read_series(files: Sequence[str | Path], where: str) -> sitk.Image:
    """A checked series (see `ordered_files`) read as one 3D image with its exact geometry."""
    ordered = ordered_files(files, where)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in ordered])
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise InputError(f"{where}: the DICOM series cannot be read ({str(error).strip().splitlines()[-1]})") from None


def read_ct_series(folder: str | Path, series_uid: str | None = None) -> sitk.Image:
    """The image series of a DICOM folder (or the one chosen by UID), checked and read; see the module."""
    series = choose_series(folder, series_uid)
    return read_series(series.files, str(folder))
