"""medseg.io: geometry survives every write/read, writes are atomic, inputs are never touched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_grid, write_dicom_series

from medseg.errors import InputError
from medseg.io import (
    Grid,
    atomic_path,
    from_array,
    read_image,
    read_label,
    to_array,
    write_image,
    write_label_map,
)

ORIENTATIONS = ["LPS", "RAS", "PLI", "oblique"]
SUFFIXES = [".nii.gz", ".nrrd", ".mha"]


def digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


# --------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_mask_written_on_the_image_grid(write_case, tmp_path, orientation, suffix):
    image_path, _, grid = write_case(orientation=orientation, suffix=suffix)
    image, read_grid = read_image(image_path)
    assert read_grid.matches(grid)
    mask = (image[0] > 0).astype(np.uint8) * 3

    out = write_label_map(mask, read_grid, tmp_path / "out" / f"mask{suffix}")

    source, written = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(out))
    assert_same_geometry(written, source)
    np.testing.assert_allclose(written.GetDirection(), grid.direction, atol=1e-6)
    assert written.GetPixelID() == sitk.sitkUInt8
    labels, label_grid = read_label(out)
    assert labels.dtype == np.uint8 and label_grid.matches(read_grid)
    np.testing.assert_array_equal(labels, mask)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_nifti_has_qform_and_sform_code_1(write_case, tmp_path, orientation):
    _, label_path, grid = write_case(orientation=orientation)
    header = nib.load(label_path).header
    assert int(header["qform_code"]) == 1 and int(header["sform_code"]) == 1
    assert header.get_data_dtype() == np.uint8
    # nibabel (RAS) agrees with the grid's RAS affine, as TorchIO will see it.
    np.testing.assert_allclose(nib.load(label_path).affine, grid.ras_affine, atol=1e-4)


def test_image_round_trip_keeps_values(tmp_path):
    grid = make_grid("oblique", shape=(6, 5, 4))
    values = np.random.default_rng(0).normal(size=grid.shape).astype(np.float32)
    array, read_grid = read_image(write_image(values, grid, tmp_path / "prob.nii.gz"))
    assert array.shape == (1, *grid.shape) and array.dtype == np.float32
    np.testing.assert_array_equal(array[0], values)
    assert read_grid.matches(grid)


# ------------------------------------------------------------------------------------ atomic


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "mask.nii.gz"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_file_replaced_only_on_success(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("new, half written")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_writer_error_leaves_no_temp_file(tmp_path):
    grid = make_grid(shape=(4, 4, 4))
    with pytest.raises(InputError, match=r"cannot write .*mask\.xyz"):
        write_label_map(np.zeros(grid.shape, np.uint8), grid, tmp_path / "mask.xyz")
    assert list(tmp_path.iterdir()) == []


def test_write_under_a_file_is_an_input_error(tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    grid = make_grid(shape=(4, 4, 4))
    with pytest.raises(InputError, match="blocker"):
        write_label_map(np.zeros(grid.shape, np.uint8), grid, tmp_path / "blocker" / "mask.nii.gz")


# ------------------------------------------------------------------------------------- reads


def test_reads_do_not_modify_inputs(write_case):
    image_path, label_path, _ = write_case(orientation="PLI")
    before = digest(image_path), digest(label_path), image_path.stat().st_mtime_ns
    read_image(image_path)
    read_label(label_path)
    assert (digest(image_path), digest(label_path), image_path.stat().st_mtime_ns) == before


def test_scan_in_its_own_voxel_type_is_a_view_that_goes_back_without_a_copy(tmp_path):
    """`read_image(dtype=None)` hands out the file's voxels read-only; `from_array` gives that very image
    back, and any other array (flipped, another grid, a copy) a new image of its own values."""
    import gc

    grid = make_grid("LPS", shape=(12, 10, 8))
    values = np.random.default_rng(0).integers(-1000, 1000, grid.shape).astype(np.int16)
    path = write_image(values, grid, tmp_path / "scan.nii.gz")
    array, read_grid = read_image(path, dtype=None)
    gc.collect()  # nothing but the array holds the image now: its voxels must still be there
    assert np.array_equal(array[0], values) and not array.flags.writeable
    with pytest.raises(ValueError):
        array[0, 0, 0, 0] = 1
    image = from_array(array[0], read_grid)
    assert image is from_array(array[0], read_grid)  # the image read from disk, not a copy
    assert np.array_equal(to_array(image), values)
    flipped = from_array(array[0][::-1], read_grid)
    assert np.array_equal(to_array(flipped), values[::-1])
    moved = Grid(read_grid.shape, read_grid.spacing, (1.0, 2.0, 3.0), read_grid.direction)
    assert Grid.of(from_array(array[0], moved)) == moved
    assert Grid.of(from_array(array[0], read_grid)) == read_grid  # the moved copy left the original alone
    assert read_image(path)[0].flags.writeable  # float32 (training's default): a copy of its own


def test_channels_stack_to_cxyz(write_case):
    first, _, grid = write_case("t2", seed=1)
    second, _, _ = write_case("adc", seed=2)
    array, read_grid = read_image([first, second])
    assert array.shape == (2, *grid.shape) and array.dtype == np.float32
    assert read_grid.matches(grid)
    np.testing.assert_array_equal(array[1], read_image(second)[0][0])


def test_channels_on_different_grids_are_refused(write_case):
    first, _, _ = write_case("t2")
    second, _, _ = write_case("adc", origin=(0.0, 0.0, 0.0))
    with pytest.raises(InputError, match=r"adc\.nii\.gz: channel grid .* differs from .*t2\.nii\.gz"):
        read_image([first, second])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_truncated_nifti_is_refused(write_case, tmp_path, suffix):
    image_path, _, _ = write_case(suffix=suffix)
    data = image_path.read_bytes()
    truncated = tmp_path / f"half{suffix}"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="half.* truncated or corrupt"):
        read_image(truncated)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_nan_and_inf_voxels_are_refused(tmp_path, suffix):
    """ITK's NIfTI reader turns NaN/inf into 0; they must be reported, not silently zeroed."""
    grid = make_grid(shape=(6, 5, 4))
    values = np.zeros(grid.shape, np.float32)
    values[1, 2, 3], values[4, 0, 0], values[0, 1, 0] = np.nan, np.inf, -np.inf
    path = write_image(values, grid, tmp_path / f"nan{suffix}")
    with pytest.raises(InputError, match=r"nan\.\w+(\.gz)?: image has 3 NaN/inf voxels"):
        read_image(path)


def test_truncated_float_nifti_is_refused(tmp_path):
    grid = make_grid(shape=(30, 20, 10))
    path = write_image(np.random.default_rng(0).normal(size=grid.shape).astype(np.float32), grid,
                       tmp_path / "float.nii.gz")
    path.write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(InputError, match=r"float\.nii\.gz: file is truncated or corrupt"):
        read_image(path)


def test_multi_member_gzip_nifti_is_read(write_case, tmp_path):
    """A valid gzip of two members (as some tools write) must not be mistaken for a truncated file."""
    import gzip

    image_path, _, _ = write_case()
    raw = gzip.decompress(image_path.read_bytes())
    multi = tmp_path / "multi.nii.gz"
    multi.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    np.testing.assert_array_equal(read_image(multi)[0], read_image(image_path)[0])


# ------------------------------------------------------------------------------------- DICOM


@pytest.mark.parametrize("orientation", ["LPS", "oblique"])
def test_dicom_series_is_ordered_by_position(tmp_path, orientation):
    grid = make_grid(orientation, shape=(12, 10, 7), spacing=(0.8, 0.7, 2.0))
    volume = np.random.default_rng(3).integers(-1000, 1500, grid.shape).astype(np.int16)
    folder = tmp_path / "series"
    names = write_dicom_series(volume, grid, folder)
    assert not np.array_equal(names, np.arange(len(names)))  # file name order is not slice order
    before = digest(folder)

    array, read_grid = read_image(folder)

    np.testing.assert_array_equal(array[0], volume)
    np.testing.assert_allclose(read_grid.spacing, grid.spacing, rtol=1e-5)
    np.testing.assert_allclose(read_grid.origin, grid.origin, atol=1e-3)
    np.testing.assert_allclose(read_grid.direction, grid.direction, atol=1e-5)
    assert digest(folder) == before


def test_folder_without_dicom_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a scan")
    with pytest.raises(InputError, match="holds no DICOM series"):
        read_image(tmp_path)
