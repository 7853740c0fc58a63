"""`medseg predict --dicom-seg --rtstruct` on a DICOM CT series: both files refer to the CT and hold the
same organs as the NIfTI mask written beside them; a NIfTI input is refused before anything is written."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import blob_case, make_grid

from medseg.cli import main
from medseg.config import load_task
from medseg.dicom.export import DicomOutputs, write_dicom_outputs
from medseg.dicom.rtstruct import read_rtstruct
from medseg.errors import InputError
from medseg.io import Grid, read_label, write_image


def _blob_series(tmp_path, ct_series, orientation="PLI"):
    grid = make_grid(orientation, shape=(48, 40, 20), spacing=(1.5, 1.5, 3.0))  # the tiny model's training cases
    image, labels = blob_case(grid, seed=3)
    folder = tmp_path / "patient1"
    files = ct_series(folder, grid.apply_to(sitk.GetImageFromArray(image.transpose(2, 1, 0))),
                      patient_position="FFS")
    return folder, files, labels


def test_predict_writes_seg_and_rtstruct_matching_the_nifti(tiny_model, tmp_path, ct_series, capsys):
    folder, files, _ = _blob_series(tmp_path, ct_series)
    out = tmp_path / "out"
    assert main(["predict", str(folder), "-o", str(out), "-m", str(tiny_model), "--dicom-seg", "--rtstruct",
                 "--no-overlays"]) == 0
    mask, grid = read_label(out / "patient1_seg.nii.gz")
    assert mask.any()
    names = {1: "prostate", 2: "bladder", 3: "rectum", 4: "femoral_head_left", 5: "femoral_head_right"}
    present = [n for n in names if (mask == n).any()]
    cts = {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)}
    ct = next(iter(cts.values()))

    seg = hd.seg.segread(out / "patient1_seg.dcm")
    assert seg.SeriesDescription == f"medseg tiny model {tiny_model.name}"
    assert seg.StudyInstanceUID == ct.StudyInstanceUID
    assert sorted(str(r.ReferencedSOPInstanceUID) for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) \
        == sorted(cts)
    order = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
             for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))]  # voxel slice k
    labels = {seg.get_segment_description(n).SegmentLabel: n for n in seg.segment_numbers}
    assert sorted(labels) == sorted(names[n] for n in present)
    for number in present:
        pixels = seg.get_pixels_by_source_instance(order, segment_numbers=[labels[names[number]]],
                                                   assert_missing_frames_are_empty=True)
        np.testing.assert_array_equal(pixels[..., 0].transpose(2, 1, 0) > 0, mask == number)

    rtstruct = pydicom.dcmread(out / "patient1_rtstruct.dcm")
    assert rtstruct.SeriesDescription == seg.SeriesDescription and rtstruct.StudyInstanceUID == ct.StudyInstanceUID
    series = rtstruct.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert sorted(str(r.ReferencedSOPInstanceUID) for r in series.ContourImageSequence) == sorted(cts)
    contours = read_rtstruct(out / "patient1_rtstruct.dcm", grid, files)
    assert sorted(contours) == sorted(names[n] for n in present)
    for number in present:
        np.testing.assert_array_equal(contours[names[number]], mask == number)
    assert "patient1: wrote patient1_seg.dcm, patient1_rtstruct.dcm" in capsys.readouterr().err


def test_nifti_input_is_refused_before_anything_is_written(tiny_model, tmp_path, capsys):
    grid = make_grid("LPS", shape=(24, 20, 10))
    scan = write_image(blob_case(grid)[0], grid, tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    assert main(["predict", str(scan), "-o", str(out), "-m", str(tiny_model), "--rtstruct"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {scan}: DICOM-SEG/RTSTRUCT output needs a DICOM CT series as input (a folder)"
    assert not out.exists()


def test_nothing_segmented_writes_no_dicom(tmp_path, ct_series):
    folder, files, labels = _blob_series(tmp_path, ct_series)
    image = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    task = load_task("prostate")
    outputs = DicomOutputs(seg=True, rtstruct=True)
    assert write_dicom_outputs(np.zeros(image.GetSize(), np.uint8), Grid.of(image), files, task, "run1",
                               tmp_path / "out", "patient1", outputs) == []
    assert not (tmp_path / "out").exists()
    written = write_dicom_outputs(labels, Grid.of(image), files, task, "run1", tmp_path / "out", "p", outputs)
    assert [p.name for p in written] == ["p_seg.dcm", "p_rtstruct.dcm"]
    names = [r.ROIName for r in pydicom.dcmread(written[1]).StructureSetROISequence]
    assert names == ["Prostate", "Bladder", "Rectum", "Femur_Head_L", "Femur_Head_R"]  # TG-263, from the task


def test_a_mask_of_another_grid_is_refused(tmp_path, ct_series):
    folder, files, labels = _blob_series(tmp_path, ct_series)
    image = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    grid = Grid.of(image)
    shifted = Grid(grid.shape, grid.spacing, tuple(np.add(grid.origin, (0.0, 0.0, 6.0))), grid.direction)
    with pytest.raises(InputError, match="the CT slices do not lie on the mask's grid"):
        write_dicom_outputs(np.asarray(labels), shifted, files, load_task("prostate"), "run1", tmp_path / "out", "p",
                            DicomOutputs(rtstruct=True))
    assert not (tmp_path / "out").exists()
