"""medseg.datasets: the three layouts, their errors, the dataset check and the fingerprint."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import make_grid
from medseg.config import load_task
from medseg.datasets import Case, check_dataset, compute_fingerprint, default_fingerprint_path, load_dataset
from medseg.errors import InputError
from medseg.io import read_image, read_label, write_label_map

PROSTATE = load_task("prostate")


def make_msd(root: Path, write_case, orientations=("LPS", "PLI", "PLI"), test=0) -> Path:
    """An MSD dataset of blob cases: imagesTr/, labelsTr/ and dataset.json (test cases as plain paths)."""
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / folder).mkdir(parents=True)
    entries = {"training": [], "test": []}
    for i, orientation in enumerate([*orientations, *["RAS"] * test]):
        split, suffix = ("training", "Tr") if i < len(orientations) else ("test", "Ts")
        image, label, _ = write_case(f"case_{i:03d}", orientation=orientation, seed=i)
        image.rename(root / f"images{suffix}" / f"case_{i:03d}.nii.gz")
        label.rename(root / f"labels{suffix}" / f"case_{i:03d}.nii.gz")
        image_entry = f"./images{suffix}/case_{i:03d}.nii.gz"
        entries[split].append({"image": image_entry, "label": f"./labels{suffix}/case_{i:03d}.nii.gz"}
                              if split == "training" else image_entry)
    (root / "dataset.json").write_text(json.dumps({"name": "Pelvis", "labels": {"0": "background"}, **entries}))
    return root


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.fixture
def msd(tmp_path, write_case) -> Path:
    return make_msd(tmp_path / "Task01_Pelvis", write_case)


# ------------------------------------------------------------------------------------- layouts


def test_msd_layout(tmp_path, write_case):
    root = make_msd(tmp_path / "msd", write_case, test=2)
    (root / "labelsTs" / "case_004.nii.gz").unlink()  # one test case without a reference
    edit_json(root / "dataset.json", training=[
        {"image": "./imagesTr/case_000.nii.gz", "label": "./labelsTr/case_000.nii.gz", "contoured": ["prostate"]},
        {"image": "imagesTr/case_001.nii.gz", "label": "labelsTr/case_001.nii.gz"},
    ])

    train = load_dataset(root)
    assert train == [
        Case("case_000", (root / "imagesTr/case_000.nii.gz",), root / "labelsTr/case_000.nii.gz", ("prostate",)),
        Case("case_001", (root / "imagesTr/case_001.nii.gz",), root / "labelsTr/case_001.nii.gz"),
    ]
    test = load_dataset(root, "test")
    assert [(c.name, c.label) for c in test] == [("case_003", root / "labelsTs/case_003.nii.gz"), ("case_004", None)]


def test_msd_test_entries_with_labels(msd):
    edit_json(msd / "dataset.json", test=[{"image": "./imagesTr/case_000.nii.gz", "label": "./labelsTr/case_000.nii.gz"}])
    assert load_dataset(msd, "test") == [Case("case_000", (msd / "imagesTr/case_000.nii.gz",),
                                              msd / "labelsTr/case_000.nii.gz")]


def test_nnunet_v2_layout(tmp_path, write_case):
    root = tmp_path / "Dataset001_Pelvis"
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / folder).mkdir(parents=True)
    for name, split in [("pelvis_001", "Tr"), ("pelvis_002", "Tr"), ("pelvis_101", "Ts"), ("pelvis_102", "Ts")]:
        image, label, _ = write_case(name)
        shutil.copy(image, root / f"images{split}" / f"{name}_0001.nii.gz")
        image.rename(root / f"images{split}" / f"{name}_0000.nii.gz")
        if name != "pelvis_102":
            label.rename(root / f"labels{split}" / f"{name}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "prostate": 1},
        "numTraining": 2, "file_ending": ".nii.gz"}))

    train = load_dataset(root)
    assert [c.name for c in train] == ["pelvis_001", "pelvis_002"]
    assert train[0].images == (root / "imagesTr/pelvis_001_0000.nii.gz", root / "imagesTr/pelvis_001_0001.nii.gz")
    assert train[0].label == root / "labelsTr/pelvis_001.nii.gz"
    test = load_dataset(root, "test")
    assert [(c.name, c.label is not None) for c in test] == [("pelvis_101", True), ("pelvis_102", False)]

    (root / "imagesTr/pelvis_002_0001.nii.gz").unlink()
    with pytest.raises(InputError, match=r"1 file\(s\) of the dataset do not exist: imagesTr/pelvis_002_0001\.nii\.gz"):
        load_dataset(root)


def test_plain_layout(tmp_path, write_case):
    root = tmp_path / "plain"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name in ("a", "b"):
        image, label, _ = write_case(name)
        image.rename(root / "images" / f"{name}.nii.gz")
        label.rename(root / "labels" / f"{name}.nii.gz")
    image, label, _ = write_case("c")
    shutil.copy(image, root / "images" / "c_0001.nii.gz")
    image.rename(root / "images" / "c_0000.nii.gz")
    label.rename(root / "labels" / "c.nii.gz")
    (root / "images" / "README.txt").write_text("not an image")  # other files are ignored
    (root / "images" / ".DS_Store").write_text("")

    cases = load_dataset(root)
    assert [(c.name, len(c.images)) for c in cases] == [("a", 1), ("b", 1), ("c", 2)]
    assert cases[2].images == (root / "images/c_0000.nii.gz", root / "images/c_0001.nii.gz")
    assert load_dataset(root, "test") == []

    write_case("d")[0].rename(root / "images" / "d.nii.gz")
    with pytest.raises(InputError, match=r"images/d\.nii\.gz: no label of the same case name in .*labels"):
        load_dataset(root)


# -------------------------------------------------------------------------------------- errors


def _outside(root: Path) -> None:
    edit_json(root / "dataset.json", training=[{"image": "../secret.nii.gz", "label": "./labelsTr/case_000.nii.gz"}])


def _absolute_outside(root: Path) -> None:
    edit_json(root / "dataset.json", training=[{"image": "/etc/passwd", "label": "./labelsTr/case_000.nii.gz"}])


def _sneaky_outside(root: Path) -> None:
    edit_json(root / "dataset.json", training=[{"image": "imagesTr/../../x.nii.gz", "label": "labelsTr/case_000.nii.gz"}])


@pytest.mark.parametrize("break_it, message", [
    pytest.param(lambda r: shutil.rmtree(r), r"Task01_Pelvis: no such dataset folder", id="missing-folder"),
    pytest.param(lambda r: (r / "dataset.json").unlink(),
                 r"Task01_Pelvis: no recognisable dataset layout; expected MSD .* nnU-Net v2 .*images/ and labels/",
                 id="no-layout"),
    pytest.param(lambda r: (r / "dataset.json").write_text('{"training": [,]}'),
                 r"dataset\.json: not valid JSON \(Expecting value at line 1, column 15\)", id="invalid-json"),
    pytest.param(lambda r: (r / "dataset.json").write_text('{"name": "x"}'),
                 r"dataset\.json: has no 'training' list \(MSD\) nor 'channel_names'", id="no-training"),
    pytest.param(lambda r: edit_json(r / "dataset.json", training={"a": 1}),
                 r"dataset\.json: 'training' must be a list of cases", id="training-not-list"),
    pytest.param(lambda r: edit_json(r / "dataset.json", training=[{"image": "./imagesTr/case_000.nii.gz"}]),
                 r"dataset\.json: 'training\[0\]' must be \{\"image\": PATH, \"label\": PATH\}", id="entry-no-label"),
    pytest.param(_outside, r"dataset\.json: 'training\[0\]\.image' points outside the dataset folder: \.\./secret",
                 id="outside"),
    pytest.param(_absolute_outside, r"'training\[0\]\.image' points outside the dataset folder: /etc/passwd",
                 id="absolute-outside"),
    pytest.param(_sneaky_outside, r"'training\[0\]\.image' points outside the dataset folder", id="dotdot-inside"),
    pytest.param(lambda r: (r / "labelsTr" / "case_001.nii.gz").unlink(),
                 r"1 file\(s\) of the dataset do not exist: labelsTr/case_001\.nii\.gz", id="missing-file"),
    pytest.param(lambda r: edit_json(r / "dataset.json", training=[]), r"the dataset has no training cases",
                 id="no-cases"),
    pytest.param(lambda r: edit_json(r / "dataset.json", training=[
        {"image": "imagesTr/case_000.nii.gz", "label": "labelsTr/case_000.nii.gz", "contoured": "prostate"}]),
        r"'training\[0\]\.contoured' must be a list of organ names", id="contoured-not-list"),
])
def test_dataset_errors(msd, break_it, message):
    break_it(msd)
    with pytest.raises(InputError, match=message) as error:
        load_dataset(msd)
    assert "\n" not in str(error.value)
    with pytest.raises(InputError, match=message):  # the check refuses the same way, before any reading
        check_dataset(msd, PROSTATE, fingerprint_path=msd.parent / "fp.json")


def test_a_file_is_not_a_dataset(tmp_path):
    (tmp_path / "scan.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match=r"scan\.nii\.gz: expected a dataset folder, got a file"):
        load_dataset(tmp_path / "scan.nii.gz")


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
