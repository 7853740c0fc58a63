"""Write a scan as a DICOM CT series: sample data for the DICOM workflow, and test fixtures.

Any grid is written faithfully: image rows follow voxel axis j and columns axis i, so the series read
back (by SimpleITK, pydicom or a planning system) has the scan's spacing, origin and direction, head
first or feet first.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg.dicom import require

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass(frozen=True)
class Patient:
    """Who and which study a generated series belongs to (synthetic values, never real people)."""

    patient_id: str = "PHANTOM001"
    patient_name: str = "Phantom^One"
    study_description: str = "Synthetic CT"
    series_description: str = "CT phantom"
    patient_position: str = "HFS"  # HFS head first supine, FFS feet first supine: a tag, the grid is the image's
    study_uid: str | None = None  # new UIDs when None
    frame_of_reference_uid: str | None = None


def _dataset(pydicom, image: sitk.Image, patient: Patient, uids: dict, k: int, pixels: np.ndarray):
    from pydicom.dataset import FileDataset, FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    today = datetime.date.today().strftime("%Y%m%d")
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = patient.patient_name, patient.patient_id
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = uids["frame"], ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.StudyDescription, ds.SeriesDescription = patient.study_description, patient.series_description
    ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "CT", "medseg", 1, k + 1
    ds.PatientPosition, ds.ImageType, ds.KVP = patient.patient_position, ["ORIGINAL", "PRIMARY", "AXIAL"], 120
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing, origin = image.GetSpacing(), np.array(image.GetOrigin())
    position = origin + direction[:, 2] * spacing[2] * k
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])]
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.SliceLocation = f"{float(position @ direction[:, 2]):.4f}"
    ds.PixelSpacing = [f"{spacing[1]:.6g}", f"{spacing[0]:.6g}"]  # between rows, between columns
    ds.SliceThickness = f"{spacing[2]:.6g}"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
    ds.PixelData = pixels.astype("<i2").tobytes()
    return ds


def write_ct_series(image: sitk.Image, folder: str | Path, patient: Patient = Patient(),
                    series_uid: str | None = None) -> list[Path]:
    """One file per slice (`CT_0001.dcm`, ...) in `folder`, HU rounded to int16; returns the paths.

    Slice k of the image (voxel axis k) is file k; every file shares the study, series and frame of
    reference UIDs, so any reader sorts them by position into the same volume.
    """
    pydicom = require("pydicom", "writing a DICOM series")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uids = {"study": patient.study_uid or pydicom.uid.generate_uid(),
            "series": series_uid or pydicom.uid.generate_uid(),
            "frame": patient.frame_of_reference_uid or pydicom.uid.generate_uid()}
    volume = np.clip(np.rint(sitk.GetArrayFromImage(image)), -32768, 32767)  # (Z, Y, X): rows j, columns i
    paths = []
    for k, pixels in enumerate(volume):
        path = folder / f"CT_{k + 1:04d}.dcm"
        _dataset(pydicom, image, patient, uids, k, pixels).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
