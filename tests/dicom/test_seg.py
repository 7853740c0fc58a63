"""Mask -> DICOM-SEG -> mask is exact, head first and feet first; the file read back by highdicom and
pydicom on their own, frames matched to CT slices by SOPInstanceUID in SimpleITK's slice order."""

from __future__ import annotations

import sys

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from phantoms import FEET_FIRST, HEAD_FIRST, ROWS_ALONG_X, ct_of, phantom_grid, phantom_organs

from medseg.dicom.reference import Structure
from medseg.dicom.seg import read_dicom_seg, write_dicom_seg
from medseg.errors import InputError

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
STRUCTURES = [Structure(1, "Brainstem", (230, 25, 75), "brainstem"),
              Structure(2, "Parotid_R", (0, 130, 200), "right_parotid"),
              Structure(3, "Ring", (60, 180, 75), "ring"), Structure(4, "TwoPieces", (245, 130, 48), "two_pieces"),
              Structure(6, "Larynx", (145, 30, 180), "larynx")]  # absent from the phantom: left out


def _series(tmp_path, ct_series, direction, in_plane=1.25, slice_mm=2.5):
    grid = phantom_grid(direction, in_plane, slice_mm)
    labels = phantom_organs(grid)
    files = ct_series(tmp_path / "ct", ct_of(labels, grid))
    return labels, files


def _uids_in_sitk_order(folder) -> list[str]:
    """SOPInstanceUIDs in the slice order SimpleITK (GDCM) reads the series: voxel slice k."""
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    return [str(pydicom.dcmread(n, stop_before_pixels=True).SOPInstanceUID) for n in names]


@pytest.mark.parametrize("direction, in_plane, slice_mm", [
    pytest.param(HEAD_FIRST, 0.8, 2.0, id="head-first-0.8mm"),
    pytest.param(FEET_FIRST, 1.25, 2.5, id="feet-first-1.25mm"),
    pytest.param(FEET_FIRST, 0.8, 2.0, id="feet-first-0.8mm"),
    pytest.param(ROWS_ALONG_X, 1.25, 2.5, id="rows-along-x-1.25mm"),
])
def test_round_trip_is_exact(tmp_path, ct_series, direction, in_plane, slice_mm):
    labels, files = _series(tmp_path, ct_series, direction, in_plane, slice_mm)
    path = write_dicom_seg(labels, files, STRUCTURES, tmp_path / "seg.dcm", "medseg test (model run1)")
    seg = hd.seg.segread(path)
    segments = [seg.get_segment_description(n).SegmentLabel for n in seg.segment_numbers]
    assert segments == [s.name for s in STRUCTURES[:4]]
    pixels = seg.get_pixels_by_source_instance(_uids_in_sitk_order(tmp_path / "ct"), combine_segments=True,
                                               assert_missing_frames_are_empty=True)  # (Z, rows, columns)
    lookup = np.array([0, 1, 2, 3, 4, 0, 0], np.uint8)  # segment numbers 1..4 are labels 1..4
    np.testing.assert_array_equal(pixels.transpose(2, 1, 0), lookup[labels])
    masks = read_dicom_seg(path, files)
    for s in STRUCTURES[:4]:
        np.testing.assert_array_equal(masks[s.name], labels == s.number)


def test_file_refers_to_the_ct_and_names_the_organs(tmp_path, ct_series):
    labels, files = _series(tmp_path, ct_series, FEET_FIRST)
    path = write_dicom_seg(labels, files, STRUCTURES, tmp_path / "seg.dcm", "medseg headneck (model run1)",
                           algorithm="medseg headneck run1")
    ds = pydicom.dcmread(path)
    cts = {str(c.SOPInstanceUID): c for c in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)}
    ct = next(iter(cts.values()))
    assert ds.SOPClassUID == SEG_STORAGE and ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.SeriesDescription == "medseg headneck (model run1)"
    assert (ds.StudyInstanceUID, ds.PatientID, ds.FrameOfReferenceUID) == (
        ct.StudyInstanceUID, ct.PatientID, ct.FrameOfReferenceUID)
    (series,) = ds.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == ct.SeriesInstanceUID
    assert sorted(str(r.ReferencedSOPInstanceUID) for r in series.ReferencedInstanceSequence) == sorted(cts)
    for item, s in zip(ds.SegmentSequence, STRUCTURES):
        assert (item.SegmentLabel, item.TrackingID, item.SegmentDescription) == (s.name, s.name, s.label)
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName == "medseg headneck run1"
        (algorithm,) = item.SegmentationAlgorithmIdentificationSequence
        assert algorithm.AlgorithmName == "medseg headneck run1"
        rgb = hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb()
        assert np.abs(np.subtract(rgb, s.color)).max() <= 2
    assert len(ds.SegmentSequence) == 4  # larynx, absent, is not a segment


def test_nothing_segmented_writes_nothing(tmp_path, ct_series):
    labels, files = _series(tmp_path, ct_series, HEAD_FIRST)
    with pytest.raises(InputError, match="no organ was segmented, so there is no DICOM-SEG to write"):
        write_dicom_seg(np.zeros_like(labels), files, STRUCTURES, tmp_path / "seg.dcm", "test")
    with pytest.raises(InputError, match=r"the mask is 77x64x18 voxels but the CT series is 77x64x19"):
        write_dicom_seg(labels[..., 1:], files, STRUCTURES, tmp_path / "seg.dcm", "test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]


def test_missing_library_is_a_one_line_error(tmp_path, ct_series, monkeypatch):
    labels, files = _series(tmp_path, ct_series, HEAD_FIRST)
    monkeypatch.setitem(sys.modules, "highdicom", None)  # as if the dicom extra were not installed
    with pytest.raises(InputError, match=r"writing a DICOM-SEG needs the optional package 'highdicom': "
                                         r"pip install \"medseg\[dicom\]\""):
        write_dicom_seg(labels, files, STRUCTURES, tmp_path / "seg.dcm", "test")
