"""medseg.fingerprint: the dataset check (every problem, one line each) and the fingerprint."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import edit_json, make_grid, make_msd

from medseg.config import load_task
from medseg.data.datasets import Case, load_dataset
from medseg.data.fingerprint import (
    check_dataset,
    compute_fingerprint,
    default_fingerprint_path,
)
from medseg.errors import InputError
from medseg.io import read_image, read_label, write_label_map

PROSTATE = load_task("prostate")


# ------------------------------------------------------------------------------- fingerprint


def test_fingerprint_in_ras_axis_order(msd):
    fp = compute_fingerprint(load_dataset(msd), PROSTATE)
    assert set(fp) >= {"num_cases", "median_spacing", "median_shape", "spacing_min", "spacing_max", "shape_min",
                       "shape_max", "foreground_intensity", "organ_volume_ml"}
    assert fp["num_cases"] == 3
    # LPS keeps (1.2, 1.1, 2.5) mm and 40x36x24 voxels; PLI's first voxel axis runs posterior, its second left.
    assert fp["median_spacing"] == [1.1, 1.2, 2.5]
    assert fp["spacing_min"] == [1.1, 1.1, 2.5] and fp["spacing_max"] == [1.2, 1.2, 2.5]
    assert fp["median_shape"] == [36, 40, 24]
    assert fp["shape_min"] == [36, 36, 24] and fp["shape_max"] == [40, 40, 24]
    assert fp["median_shape_at_median_spacing"] == [36, 40, 24]


def test_fingerprint_statistics(msd):
    cases = load_dataset(msd)
    fp = compute_fingerprint(cases, PROSTATE)

    images = [read_image(c.images)[0][0] for c in cases]
    labels = [read_label(c.label)[0] for c in cases]
    assert all(0 < (lab > 0).sum() < 10_000 for lab in labels)  # small enough that nothing is sampled
    foreground = np.concatenate([im[lab > 0] for im, lab in zip(images, labels)])
    (stats,) = fp["foreground_intensity"]
    assert stats["mean"] == pytest.approx(foreground.mean(), rel=1e-5)
    assert stats["std"] == pytest.approx(foreground.std(), rel=1e-5)
    assert stats["p00_5"] == pytest.approx(np.percentile(foreground, 0.5))
    assert stats["p99_5"] == pytest.approx(np.percentile(foreground, 99.5))
    assert (stats["min"], stats["max"]) == (foreground.min(), foreground.max())
    voxel_ml = 1.2 * 1.1 * 2.5 / 1000
    bladder = np.median([(lab == 2).sum() * voxel_ml for lab in labels])
    assert fp["organ_volume_ml"]["bladder"] == pytest.approx(bladder, rel=1e-5)
    assert json.loads(json.dumps(fp)) == fp  # plain JSON data


def test_fingerprint_samples_large_foregrounds(tmp_path):
    grid = make_grid(shape=(40, 40, 20))
    image = np.random.default_rng(0).normal(100, 20, grid.shape).astype(np.float32)
    write_label_map(np.ones(grid.shape, np.uint8), grid, tmp_path / "label.nii.gz")  # 32,000 organ voxels
    from medseg.io import write_image

    write_image(image, grid, tmp_path / "image.nii.gz")
    case = Case("big", (tmp_path / "image.nii.gz",), tmp_path / "label.nii.gz")
    first = compute_fingerprint([case], PROSTATE)
    assert first == compute_fingerprint([case], PROSTATE)  # seeded: the same voxels every time
    assert first["foreground_intensity"][0]["mean"] == pytest.approx(100, abs=1.0)
    assert first["organ_volume_ml"] == pytest.approx({"prostate": 32_000 * grid.voxel_volume_ml, "bladder": None,
                                                      "rectum": None, "femoral_head_left": None,
                                                      "femoral_head_right": None})


def test_labels_without_any_organ(msd, tmp_path):
    for path in (msd / "labelsTr").iterdir():
        grid = read_label(path)[1]
        write_label_map(np.zeros(grid.shape, np.uint8), grid, path)
    with pytest.raises(InputError, match=r"labelsTr: no label map has any organ voxel"):
        compute_fingerprint(load_dataset(msd), PROSTATE)
    report = check_dataset(msd, PROSTATE, tmp_path / "fp.json")
    assert report.problems == [f"{msd}: no label map has any organ voxel; nothing to learn from"]
    assert report.fingerprint["foreground_intensity"] == [dict.fromkeys(["mean", "std", "p00_5", "p99_5", "min",
                                                                          "max"])]


def test_fingerprint_refuses_a_bad_case(msd):
    (msd / "imagesTr" / "case_001.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match=r"case_001\.nii\.gz: file is empty \(run `medseg check-dataset`"):
        compute_fingerprint(load_dataset(msd), PROSTATE)


# -------------------------------------------------------------------------------------- check


def test_valid_dataset_passes_and_writes_fingerprint(msd, tmp_path):
    out = tmp_path / "plans" / "fp.json"
    report = check_dataset(msd, PROSTATE, fingerprint_path=out)
    assert report.problems == []
    assert report.fingerprint_path == out
    assert json.loads(out.read_text()) == report.fingerprint
    assert report.fingerprint["median_spacing"] == [1.1, 1.2, 2.5]
    summary = report.summary().splitlines()
    assert summary[0].endswith("Task01_Pelvis: MSD dataset, 3 training cases, task 'prostate'")
    assert summary[1] == "spacing (mm, RAS): 1.1x1.1x2.5 to 1.2x1.2x2.5, median 1.1x1.2x2.5"
    assert summary[2] == "size (voxels, RAS): 36x36x24 to 40x40x24, median 36x40x24"
    assert summary[-1] == "OK"
    assert sorted(p.name for p in msd.iterdir()) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr", "labelsTs"]


def test_default_fingerprint_path_is_the_working_folder(msd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_fingerprint_path(msd) == tmp_path / "Task01_Pelvis_fingerprint.json"
    report = check_dataset(msd, PROSTATE)
    assert report.fingerprint_path == tmp_path / "Task01_Pelvis_fingerprint.json"
    assert report.fingerprint_path.is_file()
    (tmp_path / "out").mkdir()  # a folder given as the target gets the default name inside it
    assert check_dataset(msd, PROSTATE, tmp_path / "out").fingerprint_path == tmp_path / "out/Task01_Pelvis_fingerprint.json"


def test_every_problem_is_reported(msd, tmp_path, write_case):
    data = (msd / "imagesTr" / "case_000.nii.gz").read_bytes()
    (msd / "imagesTr" / "case_000.nii.gz").write_bytes(data[: len(data) // 2])  # corrupted image
    _, label, _ = write_case("other", spacing=(1.0, 1.0, 2.0))
    label.replace(msd / "labelsTr" / "case_002.nii.gz")  # label on another grid

    report = check_dataset(msd, PROSTATE, fingerprint_path=tmp_path / "fp.json")

    assert len(report.problems) == 2
    assert report.problems[0].startswith("imagesTr/case_000.nii.gz: file is truncated or corrupt")
    assert report.problems[1].startswith("labelsTr/case_002.nii.gz: label grid (40x36x24 voxels at 1x1x2 mm")
    assert report.fingerprint["num_cases"] == 1
    assert report.fingerprint_path is None and not (tmp_path / "fp.json").exists()
    lines = report.summary().splitlines()
    assert [line for line in lines if line.startswith("problem: ")] == [f"problem: {p}" for p in report.problems]
    assert lines[-2:] == ["fingerprint not written: fix the problems first", "2 problems"]


def test_label_values_channels_and_contoured_organs(msd):
    grid = read_label(msd / "labelsTr" / "case_000.nii.gz")[1]
    labels = read_label(msd / "labelsTr" / "case_000.nii.gz")[0]
    labels[0, 0, :2] = [7, 9]
    write_label_map(labels, grid, msd / "labelsTr" / "case_000.nii.gz")
    edit_json(msd / "dataset.json", training=[
        {"image": "imagesTr/case_000.nii.gz", "label": "labelsTr/case_000.nii.gz"},
        {"image": "imagesTr/case_001.nii.gz", "label": "labelsTr/case_001.nii.gz", "contoured": ["prostate", "femur"]},
    ])
    two_channels = dataclasses.replace(PROSTATE, channels=("T2", "ADC"), ignore_label=9)

    problems = check_dataset(msd, two_channels, msd.parent / "fp.json").problems

    assert problems == [
        "imagesTr/case_000.nii.gz: case 'case_000' has 1 image channel(s), task 'prostate' expects 2 (T2, ADC)",
        "labelsTr/case_000.nii.gz: label value(s) 7 are not labels of task 'prostate' (expected 0, 1, 2, 3, 4, 5, 9)",
        "imagesTr/case_001.nii.gz: case 'case_001' has 1 image channel(s), task 'prostate' expects 2 (T2, ADC)",
        "imagesTr/case_001.nii.gz: case 'case_001' lists contoured organ 'femur', which is not an organ of task "
        "'prostate' (prostate, bladder, rectum, femoral_head_left, femoral_head_right)",
        "labelsTr/case_001.nii.gz: has voxels of bladder, rectum, femoral_head_left, femoral_head_right, which its "
        "'contoured' list leaves out",
    ]


def test_test_cases_are_checked_too(tmp_path, write_case):
    root = make_msd(tmp_path / "msd", write_case, orientations=("LPS",), test=1)
    (root / "imagesTs" / "case_001.nii.gz").write_text("not an image")
    report = check_dataset(root, PROSTATE, tmp_path / "fp.json")
    assert report.problems == ["imagesTs/case_001.nii.gz: not a readable image (truncated, corrupt or not "
                               "NIfTI/NRRD/MHA/DICOM)"]
    assert report.num_cases == 1 and report.fingerprint["num_cases"] == 1


def test_unwritable_fingerprint_target_fails_before_reading(msd, tmp_path):
    (tmp_path / "blocker").write_text("a file")
    with pytest.raises(InputError, match=r"cannot write .*blocker/fp\.json: .*blocker is a file, not a folder"):
        check_dataset(msd, PROSTATE, tmp_path / "blocker" / "fp.json")


def test_an_entry_outside_the_folder_is_one_problem_among_all(msd, tmp_path, write_case, capsys):
    """An escaping entry is refused, and the unreadable and mismatched cases are still listed (exit 1)."""
    from medseg.cli import main

    image, _, _ = write_case("outside")
    image.replace(msd.parent / "outside.nii.gz")  # a real, readable scan, but not the dataset's to read
    (msd / "imagesTr" / "case_000.nii.gz").write_text("not an image")
    _, label, _ = write_case("other", spacing=(1.0, 1.0, 2.0))
    label.replace(msd / "labelsTr" / "case_002.nii.gz")
    entries = json.loads((msd / "dataset.json").read_text())["training"]
    edit_json(msd / "dataset.json", training=[{"image": "../outside.nii.gz", "label": entries[1]["label"]},
                                              *entries, {"image": "imagesTr/gone.nii.gz", "label": "labelsTr/gone.nii.gz"}])

    code = main(["check-dataset", str(msd), "--task", "prostate", "--out", str(tmp_path / "fp.json")])

    problems = [line[len("problem: "):] for line in capsys.readouterr().out.splitlines() if line.startswith("problem: ")]
    assert code == 1
    assert problems == [
        "dataset.json: 'training[0].image' points outside the dataset folder: ../outside.nii.gz",
        "imagesTr/gone.nii.gz: listed in the dataset (case 'gone') but does not exist",
        "labelsTr/gone.nii.gz: listed in the dataset (case 'gone') but does not exist",
        "imagesTr/case_000.nii.gz: not a readable image (truncated, corrupt or not NIfTI/NRRD/MHA/DICOM)",
        ("labelsTr/case_002.nii.gz: label grid (40x36x24 voxels at 1x1x2 mm, orientation LPS) differs from the "
         "image's (40x36x24 voxels at 1.2x1.1x2.5 mm, orientation PLI)"),
    ]
    assert not (tmp_path / "fp.json").exists()


def test_organ_statistics_for_the_qa_flags(msd):
    cases = load_dataset(msd)
    stats = compute_fingerprint(cases, PROSTATE)["organ_statistics"]
    labels = [read_label(c.label) for c in cases]
    bladder = sorted(float((lab == 2).sum()) * grid.voxel_volume_ml for lab, grid in labels)
    assert stats["bladder"]["cases"] == stats["bladder"]["present"] == 3
    assert stats["bladder"]["volume_ml"]["min"] == pytest.approx(bladder[0], abs=1e-4)
    assert stats["bladder"]["volume_ml"]["max"] == pytest.approx(bladder[-1], abs=1e-4)
    assert stats["bladder"]["one_piece"] == 1.0
    # blob cases: the bladder sits 0.2 of the extent above the centre, the prostate 0.15 below (world S)
    assert stats["bladder"]["offset_si_mm"] > 0 > stats["prostate"]["offset_si_mm"]
    assert stats["prostate"]["height_si_mm"] > 0


def test_a_2d_task_keeps_its_organs_areas_in_mm2_down_to_a_nucleus(nuclei):
    """A nucleus is ~6e-5 mm2 (~6e-8 'mL'): sizes keep their significant digits instead of rounding to 0."""
    root, task = nuclei
    cases = load_dataset(root)
    entry = compute_fingerprint(cases, load_task(task))["organ_statistics"]["nucleus"]
    areas = sorted(float(read_label(c.label, dimensions=2)[0].sum()) * 0.0005 ** 2 for c in cases)
    assert "volume_ml" not in entry
    assert entry["area_mm2"]["min"] == pytest.approx(areas[0], rel=1e-5) and 4e-5 < areas[0] < 6e-5
    assert entry["area_mm2"]["max"] == pytest.approx(areas[-1], rel=1e-5)
    assert entry["one_piece"] == 1.0
