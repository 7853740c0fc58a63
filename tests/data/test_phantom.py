"""The bundled sample data: what the generator makes with the documented seed, anatomically placed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.config import load_task, sample_data_dir
from medseg.data.datasets import load_dataset
from medseg.data.fingerprint import check_dataset
from medseg.data.phantom import sample_case
from medseg.io import orientation_code, read_image, read_label

BUNDLED = sample_data_dir("prostate")


def test_bundled_layout_and_labels():
    meta = json.loads((BUNDLED / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", **{str(l.id): l.name for l in load_task("prostate").labels}}
    assert len(load_dataset(BUNDLED)) == meta["numTraining"] == 16
    assert len(meta["test"]) == meta["numTest"] == 4
    for entry in meta["test"]:  # test cases ship with their references
        assert (BUNDLED / entry["label"]).is_file()


@pytest.mark.parametrize("index", [0, 3, 17])
def test_bundled_cases_are_what_the_generator_makes(index):
    image, labels, grid = sample_case(index, seed=0)
    part = "Tr" if index < 16 else "Ts"
    read, read_grid = read_image(BUNDLED / f"images{part}" / f"case_{index:03d}.nii.gz")
    read_labels, _ = read_label(BUNDLED / f"labels{part}" / f"case_{index:03d}.nii.gz")
    assert read_grid.matches(grid, tolerance=1e-6)
    np.testing.assert_array_equal(read[0], image)
    np.testing.assert_array_equal(read_labels, labels)


def test_orientations_and_spacings_vary():
    cases = load_dataset(BUNDLED)
    codes, slices = set(), set()
    for case in cases:
        image = sitk.ReadImage(str(case.images[0]))
        from medseg.io import Grid

        grid = Grid.of(image)
        codes.add(orientation_code(grid))
        slices.add(round(max(grid.spacing), 2))
        assert all(0.7 <= s <= 1.2 + 1e-6 for s in sorted(grid.spacing)[:2])  # in-plane pixel size
    assert {"RAS", "LPS"} <= codes and len(codes) >= 3
    assert len(slices) >= 2 and all(2.0 <= s <= 5.0 for s in slices)


def test_left_femoral_head_is_on_the_patients_left_in_world_space():
    task = load_task("prostate")
    left, right = task.label_id("femoral_head_left"), task.label_id("femoral_head_right")
    for case in load_dataset(BUNDLED):
        image = sitk.ReadImage(str(case.label))
        array = sitk.GetArrayFromImage(image)  # (Z, Y, X)
        centres = {}
        for label in (left, right):
            zyx = np.argwhere(array == label).mean(0)
            centres[label] = image.TransformContinuousIndexToPhysicalPoint(zyx[::-1].tolist())
        # ITK world is LPS: +x points to the patient's left
        assert centres[left][0] > centres[right][0] + 50, case.name


def test_prostate_is_low_contrast_like_real_ct():
    image, labels, _ = sample_case(1, seed=0)
    prostate = image[labels == 1].mean()
    from scipy import ndimage

    ring = ndimage.binary_dilation(labels == 1, iterations=3) & (labels == 0)
    assert abs(prostate - np.median(image[ring])) < 40  # HU: barely visible, as on CT
    bladder = image[labels == 2].mean()
    assert -10 < bladder < 30  # urine


def test_bundled_dataset_passes_check(tmp_path):
    report = check_dataset(BUNDLED, load_task("prostate"), fingerprint_path=tmp_path / "fp.json")
    assert report.problems == []
    fingerprint = json.loads((tmp_path / "fp.json").read_text())
    assert len(fingerprint["median_spacing"]) == 3
