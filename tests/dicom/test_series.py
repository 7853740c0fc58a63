"""DICOM series traps: each is one line on stderr, exit 2 from `medseg predict`, and nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medseg.cli import main
from medseg.dicom.ct import Patient, write_ct_series
from medseg.dicom.series import list_series, read_ct_series, series_files
from medseg.errors import InputError
from medseg.io import Grid, read_image, write_label_map

HEAD_FIRST = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
FEET_FIRST = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # rows run A-P, columns S-I, slices R-L


def ct_image(direction=HEAD_FIRST, shape=(16, 12, 8), spacing=(0.9, 0.9, 2.5), seed=0) -> sitk.Image:
    voxels = np.random.default_rng(seed).integers(-1000, 1500, shape[::-1]).astype(np.int16)  # (Z, Y, X)
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing(spacing)
    image.SetOrigin((-7.3, 20.1, -512.5))
    image.SetDirection(direction)
    return image


def edit(path: Path, **tags) -> None:
    ds = pydicom.dcmread(path)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path)


def predict_fails(folder: Path, tmp_path: Path, capsys, *extra: str) -> str:
    """`medseg predict folder` must exit 2 with one line and write nothing; returns that line."""
    out = tmp_path / "out"
    code = main(["predict", str(folder), "-o", str(out), "-m", str(tmp_path / "no-model"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and err.startswith("error: ")
    assert not out.exists()
    return err


@pytest.mark.parametrize("direction", [HEAD_FIRST, FEET_FIRST], ids=["head-first", "feet-first"])
def test_series_reads_with_the_grid_it_was_written_on(tmp_path, direction):
    image = ct_image(direction)
    files = write_ct_series(image, tmp_path / "ct")
    for i, path in enumerate(files):  # file names unrelated to slice order
        path.rename(path.with_name(f"{(7 * i) % len(files):02d}"))

    read = read_ct_series(tmp_path / "ct")
    array, grid = read_image(tmp_path / "ct", dtype=None)

    assert Grid.of(read).matches(Grid.of(image)) and grid.matches(Grid.of(image))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))
    np.testing.assert_array_equal(array[0].transpose(2, 1, 0), sitk.GetArrayFromImage(image))


def test_two_series_are_listed_and_one_is_chosen(tmp_path, capsys, tiny_model):
    folder = tmp_path / "two"
    write_ct_series(ct_image(), folder / "a", Patient(series_description="CT 2.5mm"), series_uid="1.2.3.4")
    write_ct_series(ct_image(shape=(16, 12, 5), seed=1), folder / "b", Patient(series_description="Scout"),
                    series_uid="1.2.3.5")
    for path in [*(folder / "a").iterdir(), *(folder / "b").iterdir()]:
        path.rename(folder / f"{path.parent.name}{path.name}")

    err = predict_fails(folder, tmp_path, capsys)

    assert err == (f'error: {folder}: holds 2 image series, choose one with --series UID: '
                   f'1.2.3.4 "CT 2.5mm" (8 slices), 1.2.3.5 "Scout" (5 slices)')
    err = predict_fails(folder, tmp_path, capsys, "--series", "1.2.3.9")
    assert err == (f'error: {folder}: no image series with UID 1.2.3.9; the folder holds '
                   f'1.2.3.4 "CT 2.5mm" (8 slices), 1.2.3.5 "Scout" (5 slices)')
    assert read_image(folder, series_uid="1.2.3.5")[1].shape == (16, 12, 5)
    out = tmp_path / "chosen"
    assert main(["predict", str(folder), "-o", str(out), "-m", str(tiny_model), "--series", "1.2.3.4",
                 "--no-overlays", "--device", "cpu"]) == 0
    assert sitk.ReadImage(str(out / "two_seg.nii.gz")).GetSize() == (16, 12, 8)


def test_overlay_picks_a_series_too(tmp_path, capsys):
    folder = tmp_path / "two"
    write_ct_series(ct_image(), folder, series_uid="1.2.3.4")
    for path in folder.iterdir():
        path.rename(folder / f"a{path.name}")
    write_ct_series(ct_image(shape=(16, 12, 5), seed=1), folder, series_uid="1.2.3.5")
    labels = np.zeros((16, 12, 8), np.uint8)
    labels[4:9, 3:8, 2:6] = 2
    mask = write_label_map(labels, read_image(folder, series_uid="1.2.3.4")[1], tmp_path / "mask.nii.gz")

    assert main(["overlay", str(folder), str(mask), "-o", str(tmp_path / "none")]) == 2
    assert "holds 2 image series, choose one with --series UID" in capsys.readouterr().err
    assert main(["overlay", str(folder), str(mask), "--series", "1.2.3.4", "-o", str(tmp_path / "png")]) == 0
    assert (tmp_path / "png" / "two_axial.png").is_file()
    assert not (tmp_path / "none").exists()


def test_missing_slice(tmp_path, capsys):
    files = write_ct_series(ct_image(), tmp_path / "ct")
    files[3].unlink()

    err = predict_fails(tmp_path / "ct", tmp_path, capsys)

    assert err == (f"error: {tmp_path / 'ct'}: slices at z=-507.50 and z=-502.50 mm are 5.00 mm apart, the "
                   "series' spacing is 2.50 mm: a slice is missing")


def test_uneven_spacing(tmp_path, capsys):
    files = write_ct_series(ct_image(), tmp_path / "ct")
    edit(files[5], ImagePositionPatient=[-7.3, 20.1, -499.6])  # 0.4 mm above its place at z=-500.0

    err = predict_fails(tmp_path / "ct", tmp_path, capsys)

    assert err == (f"error: {tmp_path / 'ct'}: slices at z=-502.50 and z=-499.60 mm are 2.90 mm apart, the "
                   "series' spacing is 2.50 mm: uneven slice spacing; medseg does not resample it "
                   "(and 1 more uneven gap)")


def test_same_position_twice(tmp_path, capsys):
    files = write_ct_series(ct_image(), tmp_path / "ct")
    copy = tmp_path / "ct" / "copy.dcm"
    copy.write_bytes(files[2].read_bytes())
    edit(copy, SOPInstanceUID=pydicom.uid.generate_uid())

    err = predict_fails(tmp_path / "ct", tmp_path, capsys)

    assert "two slices at z=-507.50 mm" in err and "a slice twice" in err


def test_gantry_tilt(tmp_path, capsys):
    files = write_ct_series(ct_image(), tmp_path / "ct")
    for k, path in enumerate(files):  # each slice 2.5 * tan(15 deg) mm further back: a tilted gantry
        edit(path, ImagePositionPatient=[-7.3, 20.1 + k * 2.5 * np.tan(np.radians(15)), -512.5 + 2.5 * k])

    err = predict_fails(tmp_path / "ct", tmp_path, capsys)

    assert err == (f"error: {tmp_path / 'ct'}: slices shift 4.69 mm sideways over 17.5 mm, a gantry tilt of "
                   "15.0 degrees; medseg reads untilted series only: reconstruct the scan without tilt or "
                   "resample it first")


def test_sagittal_ct(tmp_path, capsys):
    write_ct_series(ct_image(SAGITTAL), tmp_path / "ct")

    err = predict_fails(tmp_path / "ct", tmp_path, capsys)

    assert err == (f"error: {tmp_path / 'ct'}: a sagittal CT series (slice normal 90 degrees from the head-foot "
                   "axis); medseg reads axial CT series: give the axial series")


def test_single_slice(tmp_path, capsys):
    files = write_ct_series(ct_image(), tmp_path / "ct")
    for path in files[1:]:
        path.unlink()

    err = predict_fails(tmp_path / "ct", tmp_path, capsys)

    assert err.endswith("the DICOM series has a single slice; a 3D scan needs several")


def test_structure_set_beside_the_slices_is_not_a_second_series(tmp_path):
    files = write_ct_series(ct_image(), tmp_path / "ct")
    ct = pydicom.dcmread(files[0])
    rs = pydicom.Dataset()
    rs.file_meta = pydicom.dataset.FileMetaDataset()
    rs.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    rs.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    rs.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    rs.SOPClassUID, rs.SOPInstanceUID = rs.file_meta.MediaStorageSOPClassUID, rs.file_meta.MediaStorageSOPInstanceUID
    rs.Modality, rs.SeriesInstanceUID, rs.StudyInstanceUID = "RTSTRUCT", pydicom.uid.generate_uid(), ct.StudyInstanceUID
    rs.PatientID, rs.StructureSetLabel = ct.PatientID, "OARs"
    rs.save_as(tmp_path / "ct" / "RS.dcm", enforce_file_format=True)
    (tmp_path / "ct" / "notes.txt").write_text("not DICOM")

    assert [s.uid for s in list_series(tmp_path / "ct")] == [ct.SeriesInstanceUID]
    assert series_files(tmp_path / "ct") == files


def test_a_study_folder_points_to_its_series(tmp_path, capfd):
    write_ct_series(ct_image(), tmp_path / "study" / "CT_2")
    err = predict_fails(tmp_path / "study", tmp_path, capfd)  # capfd: ITK's own warnings would show here
    assert err == (f"error: {tmp_path / 'study'}: folder holds no DICOM series (and is not an image file); its "
                   "subfolder CT_2 does: give that folder")


def test_series_uid_on_a_file_is_refused(tmp_path):
    image = ct_image()
    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(image, str(path))
    with pytest.raises(InputError, match="scan.nii.gz: a series UID chooses a series in a DICOM folder"):
        read_image(path, series_uid="1.2.3")
