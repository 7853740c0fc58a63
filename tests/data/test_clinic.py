"""The sample phantoms as a clinic's DICOM-RT export (medseg.data.phantom.clinic)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medseg.cli import main
from medseg.data.phantom import sample_case
from medseg.data.phantom.clinic import clinic_case, write_clinic_folder
from medseg.errors import InputError
from medseg.io import Grid, orientation_code


@pytest.mark.parametrize("index, code, position", [(0, "LPS", "HFS"), (1, "RPI", "FFS")])
def test_cases_are_axial_planning_cts_of_the_sample_voxels(index, code, position):
    ct, labels, patient_position = clinic_case(index)
    image, truth, _ = sample_case(index)
    assert orientation_code(Grid.of(ct)) == code and patient_position == position
    assert labels.shape == tuple(ct.GetSize())
    assert sorted(np.bincount(labels.ravel(), minlength=6)) == sorted(np.bincount(truth.ravel(), minlength=6))
    assert int(sitk.GetArrayViewFromImage(ct).sum()) == int(image.sum(dtype=np.int64))  # the same voxels, turned


def test_export_is_nested_with_unhelpful_names(tmp_path):
    out = write_clinic_folder(tmp_path / "clinic", n_cases=1)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files[-1] == "PHANTOM001/20240312_RT_PLANNING/export.log"
    assert files[-2] == "PHANTOM001/20240312_RT_PLANNING/RTSTRUCT_1/RS001.dcm"
    slices = [pydicom.dcmread(out / f, stop_before_pixels=True) for f in files[:-2]]
    assert all(f.startswith("PHANTOM001/20240312_RT_PLANNING/CT_2/IM") for f in files[:-2])
    assert [int(s.InstanceNumber) for s in slices] != list(range(1, len(slices) + 1))  # names not in slice order
    rs = pydicom.dcmread(out / files[-2])
    assert [r.ROIName for r in rs.StructureSetROISequence] == ["Prostate", "BLADDER", "Rectum", "Femur_Head_L",
                                                               "femoral head rt"]
    with pytest.raises(InputError, match="clinic: already exists and is not an empty folder"):
        write_clinic_folder(out, n_cases=1)


def test_cli_options(tmp_path, capsys):
    assert main(["sample-data", "--format", "dicom", "--test-cases", "2", "-o", str(tmp_path / "a")]) == 2
    assert main(["sample-data", "--format", "png", "-o", str(tmp_path / "b")]) == 2
    assert main(["sample-data", "--format", "dicom", "--task", "headneck", "-o", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --test-cases applies to --format nifti; a DICOM export has --cases patients",
        "error: --format 'png' is not one of nifti, dicom",
        "error: no phantom for task 'headneck' (available: prostate)",
    ]
    assert not list(tmp_path.iterdir())
