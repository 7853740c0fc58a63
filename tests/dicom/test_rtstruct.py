"""Mask -> RTSTRUCT -> mask on generated CT series, head first and feet first, two pixel spacings; the
file checked with pydicom on its own (UIDs, references, planes of the contours)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from phantoms import FEET_FIRST, HEAD_FIRST, ROWS_ALONG_X, ct_of, phantom_grid, phantom_organs

from medseg.dicom.reference import Structure
from medseg.dicom.rtstruct import RT_STRUCTURE_SET_STORAGE, read_rtstruct, write_rtstruct
from medseg.errors import InputError
from medseg.io import read_image

STRUCTURES = [Structure(1, "Brainstem", (230, 25, 75), "brainstem"), Structure(2, "Parotid_R", (0, 130, 200)),
              Structure(3, "Ring", (60, 180, 75)), Structure(4, "TwoPieces", (245, 130, 48))]
GRIDS = {
    "head-first-0.8mm": (HEAD_FIRST, 0.8, 2.0),
    "head-first-1.25mm": (HEAD_FIRST, 1.25, 2.5),
    "feet-first-0.8mm": (FEET_FIRST, 0.8, 2.0),
    "feet-first-1.25mm": (FEET_FIRST, 1.25, 2.5),
    "rows-along-x-1.25mm": (ROWS_ALONG_X, 1.25, 2.5),
}


def _series(tmp_path: Path, ct_series, key: str = "head-first-1.25mm"):
    direction, in_plane, slice_mm = GRIDS[key]
    grid = phantom_grid(direction, in_plane, slice_mm)
    labels = phantom_organs(grid)
    position = "FFS" if direction == FEET_FIRST else "HFS"
    files = ct_series(tmp_path / "ct", ct_of(labels, grid), patient_position=position)
    _, read_grid = read_image(tmp_path / "ct")  # the grid SimpleITK reads: the one masks live on
    assert read_grid.matches(grid)
    return labels, files, read_grid


@pytest.mark.parametrize("key", GRIDS)
def test_round_trip_gives_back_every_organ(tmp_path, ct_series, key):
    labels, files, grid = _series(tmp_path, ct_series, key)
    path = write_rtstruct(labels, files, STRUCTURES, tmp_path / "rs.dcm", "medseg test (model run1)")
    masks = read_rtstruct(path, grid, files)
    assert list(masks) == [s.name for s in STRUCTURES]
    for s in STRUCTURES:
        truth = labels == s.number
        assert truth.sum() * grid.voxel_volume_ml >= 5.0
        dice = 2 * np.sum(masks[s.name] & truth) / (masks[s.name].sum() + truth.sum())
        assert dice >= 0.95 and abs(masks[s.name].sum() / truth.sum() - 1) <= 0.05
        np.testing.assert_array_equal(masks[s.name], truth)  # better than required: exact


def test_file_refers_to_the_ct_as_pydicom_reads_it(tmp_path, ct_series):
    labels, files, _ = _series(tmp_path, ct_series, "feet-first-0.8mm")
    path = write_rtstruct(labels, files, STRUCTURES, tmp_path / "rs.dcm", "medseg headneck (model run1)")
    ds = pydicom.dcmread(path)
    cts = {str(c.SOPInstanceUID): c for c in (pydicom.dcmread(f) for f in files)}
    ct = next(iter(cts.values()))
    assert ds.SOPClassUID == RT_STRUCTURE_SET_STORAGE == ds.file_meta.MediaStorageSOPClassUID
    assert ds.Modality == "RTSTRUCT" and ds.SeriesDescription == "medseg headneck (model run1)"
    assert (ds.StudyInstanceUID, ds.PatientID, ds.PatientName) == (ct.StudyInstanceUID, ct.PatientID, ct.PatientName)
    assert ds.SeriesInstanceUID != ct.SeriesInstanceUID
    (frame,) = ds.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == ct.FrameOfReferenceUID
    (study,) = frame.RTReferencedStudySequence
    (series,) = study.RTReferencedSeriesSequence
    assert study.ReferencedSOPInstanceUID == ct.StudyInstanceUID and series.SeriesInstanceUID == ct.SeriesInstanceUID
    assert sorted(str(r.ReferencedSOPInstanceUID) for r in series.ContourImageSequence) == sorted(cts)
    rois = {int(r.ROINumber): r for r in ds.StructureSetROISequence}
    assert [rois[s.number].ROIName for s in STRUCTURES] == [s.name for s in STRUCTURES]
    assert all(r.ReferencedFrameOfReferenceUID == ct.FrameOfReferenceUID for r in rois.values())
    assert [o.RTROIInterpretedType for o in ds.RTROIObservationsSequence] == ["ORGAN"] * 4
    for roi, s in zip(ds.ROIContourSequence, STRUCTURES):
        assert list(roi.ROIDisplayColor) == list(s.color)
        for contour in roi.ContourSequence:
            (image,) = contour.ContourImageSequence
            slice_ = cts[str(image.ReferencedSOPInstanceUID)]
            points = np.asarray(contour.ContourData, float).reshape(-1, 3)
            assert contour.ContourGeometricType == "CLOSED_PLANAR" and contour.NumberOfContourPoints == len(points)
            iop = np.asarray(slice_.ImageOrientationPatient, float)
            normal = np.cross(iop[:3], iop[3:])
            offsets = (points - np.asarray(slice_.ImagePositionPatient, float)) @ normal
            np.testing.assert_allclose(offsets, 0, atol=1e-3)  # on the plane of the slice it names


@pytest.mark.parametrize("key", ["feet-first-1.25mm", "rows-along-x-1.25mm"])
def test_contour_areas_give_the_mask_volume(tmp_path, ct_series, key):
    """A planning system that takes volume as contour area x slice spacing gets the mask's volume (the
    hole's outline runs the other way round, so its area counts negative): pydicom and numpy only."""
    labels, files, grid = _series(tmp_path, ct_series, key)
    ds = pydicom.dcmread(write_rtstruct(labels, files, STRUCTURES, tmp_path / "rs.dcm", "test"))
    iop = np.asarray(pydicom.dcmread(files[0]).ImageOrientationPatient, float).reshape(2, 3)
    for roi, s in zip(ds.ROIContourSequence, STRUCTURES):
        area = 0.0
        for contour in roi.ContourSequence:
            u, v = (np.asarray(contour.ContourData, float).reshape(-1, 3) @ iop.T).T  # in-plane mm
            area += (np.dot(u, np.roll(v, 1)) - np.dot(v, np.roll(u, 1))) / 2
        volume_ml = abs(area) * grid.spacing[2] / 1000
        assert volume_ml == pytest.approx((labels == s.number).sum() * grid.voxel_volume_ml, rel=1e-6)


def test_contours_between_slices_snap_to_the_nearest(tmp_path, ct_series):
    labels, files, grid = _series(tmp_path, ct_series)
    path = write_rtstruct(labels, files, STRUCTURES, tmp_path / "rs.dcm", "test")
    ds = pydicom.dcmread(path)
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            points = np.asarray(contour.ContourData, float).reshape(-1, 3)
            points[:, 2] += 0.4 * grid.spacing[2]  # off the slice plane, but nearer to it than to the next
            contour.ContourData = [f"{v:.4f}" for v in points.ravel()]
    ds.save_as(tmp_path / "shifted.dcm")
    masks = read_rtstruct(tmp_path / "shifted.dcm", grid)
    np.testing.assert_array_equal(masks["Ring"], labels == 3)


def _edit(path: Path, out: Path, change) -> Path:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(out)
    return out


def test_unreadable_structures_are_one_line_errors(tmp_path, ct_series):
    labels, files, grid = _series(tmp_path, ct_series)
    path = write_rtstruct(labels, files, STRUCTURES, tmp_path / "rs.dcm", "test")

    def outside(ds):
        contour = ds.ROIContourSequence[0].ContourSequence[0]
        points = np.asarray(contour.ContourData, float).reshape(-1, 3) + [0, 0, 400]
        contour.ContourData = [f"{v:.4f}" for v in points.ravel()]

    def tilted(ds):
        contour = ds.ROIContourSequence[0].ContourSequence[0]
        points = np.asarray(contour.ContourData, float).reshape(-1, 3)
        points[:, 2] += np.linspace(0, 3 * grid.spacing[2], len(points))
        contour.ContourData = [f"{v:.4f}" for v in points.ravel()]

    def twice(ds):
        ds.StructureSetROISequence[1].ROIName = "Brainstem"

    with pytest.raises(InputError, match="crosses several CT slices"):
        read_rtstruct(_edit(path, tmp_path / "t.dcm", tilted), grid)
    with pytest.raises(InputError, match=r"'Brainstem' at .* mm lies outside the CT's 19 slices"):
        read_rtstruct(_edit(path, tmp_path / "o.dcm", outside), grid)
    with pytest.raises(InputError, match="two structures are named 'Brainstem'"):
        read_rtstruct(_edit(path, tmp_path / "d.dcm", twice), grid)
    with pytest.raises(InputError, match="not an RTSTRUCT"):
        read_rtstruct(files[0], grid)
    with pytest.raises(InputError, match="not a readable DICOM file"):
        read_rtstruct(_write(tmp_path / "junk.dcm", b"junk"), grid)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_structures_of_another_scan_are_refused(tmp_path, ct_series):
    labels, files, grid = _series(tmp_path, ct_series)
    other = ct_series(tmp_path / "other", ct_of(labels, grid))  # same grid, new UIDs
    path = write_rtstruct(labels, files, STRUCTURES, tmp_path / "rs.dcm", "test")
    with pytest.raises(InputError, match="refer to frame of reference .* not the CT's .*drawn on another scan"):
        read_rtstruct(path, grid, other)


def test_nothing_is_written_when_the_mask_does_not_fit(tmp_path, ct_series):
    labels, files, _ = _series(tmp_path, ct_series)
    with pytest.raises(InputError, match=r"the mask is 77x64x18 voxels but the CT series is 77x64x19"):
        write_rtstruct(labels[:, :, 1:], files, STRUCTURES, tmp_path / "rs.dcm", "test")
    with pytest.raises(InputError, match="no organ was segmented, so there is no RTSTRUCT to write"):
        write_rtstruct(np.zeros_like(labels), files, STRUCTURES, tmp_path / "rs.dcm", "test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]
