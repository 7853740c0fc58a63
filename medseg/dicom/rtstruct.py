"""RTSTRUCT out and in: organ masks as the closed planar contours a radiotherapy planning system reads.

Contours are drawn on voxel edges (`medseg.dicom.contours`), so the planning system's fill gives the
mask back; every point is placed in patient millimetres (LPS) from the CT slice it lies on (its
ImagePositionPatient, ImageOrientationPatient and PixelSpacing), and every contour names that slice's
SOPInstanceUID. Reading does the reverse onto a `Grid`: points to voxel indices, snapped to the nearest
slice, filled per slice with the even-odd rule.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.dicom import require
from medseg.dicom.contours import mask_to_polygons, polygons_to_mask
from medseg.dicom.reference import CtSlice, Structure, organs_on_series
from medseg.errors import InputError
from medseg.io import Grid, atomic_path

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
STUDY_COMPONENT = "1.2.840.10008.3.1.2.3.1"  # what RTReferencedStudySequence items name, by convention


def _item(**values):
    from pydicom.dataset import Dataset

    ds = Dataset()
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def _image_ref(ct: CtSlice):
    return _item(ReferencedSOPClassUID=ct.dataset.SOPClassUID, ReferencedSOPInstanceUID=ct.dataset.SOPInstanceUID)


def _contour_data(points: np.ndarray):
    """LPS points (0.1 micrometre, within the 16 characters DS allows) as an encoded element. As values,
    pydicom would check and parse every one of the ~10^5 numbers of an RTSTRUCT (20x the writing time)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    text = "\\".join(f"{v:.4f}".rstrip("0").rstrip(".") for v in points.ravel()).encode("ascii")
    text += b" " * (len(text) % 2)  # DICOM values have even length
    return RawDataElement(Tag(0x3006, 0x0050), "DS", len(text), text, 0, False, True)


def _contours(labels: np.ndarray, number: int, box: tuple[slice, ...], slices: list[CtSlice]) -> list:
    """ContourSequence items of one organ: one per polygon, on the CT slice it lies in."""
    from pydicom.charset import default_encoding

    items, corner = [], np.array([box[0].start, box[1].start], float)
    mask = labels[box] == number  # the organ's bounding box only: a CT is mostly not this organ
    for k in range(mask.shape[2]):
        ct = slices[box[2].start + k]
        for polygon in mask_to_polygons(mask[:, :, k]):
            points = ct.to_world(polygon + corner)
            item = _item(ContourImageSequence=[_image_ref(ct)], ContourGeometricType="CLOSED_PLANAR",
                         NumberOfContourPoints=len(points), ContourNumber=len(items) + 1)
            item[0x30060050] = _contour_data(points)
            item.set_original_encoding(False, True, default_encoding)  # so pydicom writes the bytes as they are
            items.append(item)
    return items


def _header(pydicom, ct, series_description: str):
    from pydicom.dataset import FileDataset, FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    now = datetime.datetime.now()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = RT_STRUCTURE_SET_STORAGE, meta.MediaStorageSOPInstanceUID
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription"):
        setattr(ds, key, ct.get(key, ""))
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "RTSTRUCT", pydicom.uid.generate_uid(), 901
    ds.SeriesDescription, ds.OperatorsName, ds.InstanceNumber = series_description[:64], "", 1
    ds.SeriesDate = ds.StructureSetDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.StructureSetTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.Manufacturer, ds.ManufacturerModelName = "medseg", series_description[:64]
    ds.StructureSetLabel, ds.StructureSetName = "medseg", series_description[:64]
    ds.ApprovalStatus = "UNAPPROVED"  # automatic contours: a clinician reviews them before planning
    return ds


def write_rtstruct(labels: np.ndarray, ct_files: Sequence[Path], structures: Sequence[Structure], path: str | Path,
                   series_description: str, grid: Grid | None = None) -> Path:
    """Write the organs of a label map as an RTSTRUCT referring to its CT series.

    Args:
        labels: (X, Y, Z) label map on the CT series' grid, voxel order as `medseg.io.read_image` gives it.
        ct_files: every file of that series, any order (slices are matched by position).
        structures: organs to write (number = label value); organs absent from `labels` are left out.
        path: the .dcm file to write (atomically).
        series_description: shown by the planning system; name the model that drew the contours.
        grid: the mask's grid, if known: the slices must lie on it (catches a mask of another series).

    Raises:
        InputError: the mask does not fit the series, or no organ is present (nothing to write).
    """
    pydicom = require("pydicom", "writing an RTSTRUCT")
    slices, present, boxes = organs_on_series(labels, ct_files, structures, grid, path, "RTSTRUCT")
    ct = slices[0].dataset
    ds = _header(pydicom, ct, series_description)
    frame = ct.FrameOfReferenceUID
    series = _item(SeriesInstanceUID=ct.SeriesInstanceUID, ContourImageSequence=[_image_ref(s) for s in slices])
    study = _item(ReferencedSOPClassUID=STUDY_COMPONENT, ReferencedSOPInstanceUID=ct.StudyInstanceUID,
                  RTReferencedSeriesSequence=[series])
    ds.ReferencedFrameOfReferenceSequence = [_item(FrameOfReferenceUID=frame, RTReferencedStudySequence=[study])]
    ds.StructureSetROISequence = [
        _item(ROINumber=s.number, ReferencedFrameOfReferenceUID=frame, ROIName=s.name[:64],
              ROIDescription=s.label[:64], ROIGenerationAlgorithm="AUTOMATIC") for s in present]
    ds.ROIContourSequence = [
        _item(ReferencedROINumber=s.number, ROIDisplayColor=[int(c) for c in s.color],
              ContourSequence=_contours(labels, s.number, boxes[s.number - 1], slices)) for s in present]
    ds.RTROIObservationsSequence = [
        _item(ObservationNumber=s.number, ReferencedROINumber=s.number, RTROIInterpretedType="ORGAN",
              ROIInterpreter="") for s in present]
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return Path(path)


# ------------------------------------------------------------------------------------------ read


def _roi_names(ds, path: Path) -> dict[int, str]:
    names: dict[int, str] = {}
    for roi in ds.get("StructureSetROISequence", []):
        name = str(roi.get("ROIName", "")).strip()
        if name in names.values():
            raise InputError(f"{path}: two structures are named '{name}'; rename one so each organ is one structure")
        names[int(roi.ROINumber)] = name or f"ROI {roi.ROINumber}"
    return names


def _check_frame(ds, path: Path, ct_files: Sequence[Path] | None) -> None:
    """An RTSTRUCT drawn on another scan must not be laid on this one."""
    if not ct_files:
        return
    pydicom = require("pydicom", "reading an RTSTRUCT")
    ct_frame = pydicom.dcmread(ct_files[0], stop_before_pixels=True).get("FrameOfReferenceUID")
    frames = {str(f.FrameOfReferenceUID) for f in ds.get("ReferencedFrameOfReferenceSequence", [])}
    frames |= {str(r.ReferencedFrameOfReferenceUID) for r in ds.get("StructureSetROISequence", [])
               if "ReferencedFrameOfReferenceUID" in r}
    if ct_frame and frames and str(ct_frame) not in frames:
        raise InputError(f"{path}: the structures refer to frame of reference {', '.join(sorted(frames))}, "
                         f"not the CT's {ct_frame}: drawn on another scan")


def _slice_polygon(points: np.ndarray, to_index: np.ndarray, grid: Grid, path: Path, name: str):
    """(k, polygon) of one contour: its points in voxel indices on the slice it lies on."""
    index = np.c_[points, np.ones(len(points))] @ to_index.T
    k = int(np.rint(np.mean(index[:, 2])))
    if np.abs(index[:, 2] - k).max() > 0.5 + 1e-3:
        raise InputError(f"{path}: a contour of '{name}' crosses several CT slices (not drawn on an axial plane "
                         "of this scan)")
    if not 0 <= k < grid.shape[2]:
        z = ", ".join(f"{v:.1f}" for v in points.mean(0))
        raise InputError(f"{path}: a contour of '{name}' at ({z}) mm lies outside the CT's {grid.shape[2]} slices")
    return k, index[:, :2]


def read_rtstruct(path: str | Path, grid: Grid, ct_files: Sequence[Path] | None = None) -> dict[str, np.ndarray]:
    """The structures of an RTSTRUCT as masks on a CT grid.

    Args:
        path: the RTSTRUCT file.
        grid: the CT's grid (`Grid.of(image)`); contours snap to the nearest slice within half a slice.
        ct_files: optional CT files; given, the RTSTRUCT must share their frame of reference.

    Returns:
        Structure name -> (X, Y, Z) bool mask, for every structure with at least one closed planar
        contour (points, lines and empty structures are left out), in the file's order.
    """
    pydicom = require("pydicom", "reading an RTSTRUCT")
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except (OSError, pydicom.errors.InvalidDicomError) as error:
        raise InputError(f"{path}: not a readable DICOM file ({error})") from None
    if ds.get("Modality") != "RTSTRUCT" or "ROIContourSequence" not in ds:
        raise InputError(f"{path}: not an RTSTRUCT (Modality {ds.get('Modality', 'missing')})")
    _check_frame(ds, path, ct_files)
    names = _roi_names(ds, path)
    to_index = np.linalg.inv(grid.affine)
    masks: dict[str, np.ndarray] = {}
    for roi in ds.ROIContourSequence:
        name = names.get(int(roi.ReferencedROINumber), f"ROI {roi.ReferencedROINumber}")
        per_slice: dict[int, list[np.ndarray]] = {}
        for contour in roi.get("ContourSequence", []):
            if contour.get("ContourGeometricType", "CLOSED_PLANAR") != "CLOSED_PLANAR":
                continue
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            k, polygon = _slice_polygon(points, to_index, grid, path, name)
            per_slice.setdefault(k, []).append(polygon)
        if not per_slice:
            continue
        masks[name] = _fill(per_slice, grid.shape)
    return masks


def _fill(per_slice: dict[int, list[np.ndarray]], shape: tuple[int, int, int]) -> np.ndarray:
    """Fill each slice's polygons inside their bounding box (a slice of a CT is mostly not this organ)."""
    mask = np.zeros(shape, dtype=bool)
    for k, polygons in per_slice.items():
        points = np.concatenate(polygons)
        low = np.clip(np.floor(points.min(0)).astype(int), 0, shape[:2])
        high = np.clip(np.ceil(points.max(0)).astype(int) + 1, 0, shape[:2])
        if np.all(high > low):
            box = (slice(low[0], high[0]), slice(low[1], high[1]))
            mask[box + (k,)] = polygons_to_mask([p - low for p in polygons], tuple(high - low))
    return mask
