"""medseg.datasets: the three layouts and their errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import edit_json, make_msd

from medseg.config import load_task
from medseg.data.datasets import Case, load_dataset
from medseg.data.fingerprint import check_dataset
from medseg.errors import InputError

PROSTATE = load_task("prostate")


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
def test_dataset_errors(msd, break_it, message, request):
    break_it(msd)
    with pytest.raises(InputError, match=message) as error:
        load_dataset(msd)
    assert "\n" not in str(error.value)
    case = request.node.callspec.id
    if case not in ENTRY_PROBLEMS:
        with pytest.raises(InputError, match=message):  # the check refuses the same way, before any reading
            check_dataset(msd, PROSTATE, fingerprint_path=msd.parent / "fp.json")
        return
    report = check_dataset(msd, PROSTATE, fingerprint_path=msd.parent / "fp.json")  # one line, the rest checked
    assert len(report.problems) == 1 and re.search(ENTRY_PROBLEMS[case] or message, report.problems[0])


# What stops training but is one problem line among all the others in `check-dataset` (None: the same message).
ENTRY_PROBLEMS = {"entry-no-label": None, "outside": None, "absolute-outside": None, "dotdot-inside": None,
                  "contoured-not-list": None, "no-cases": None,
                  "missing-file": r"^labelsTr/case_001\.nii\.gz: listed in the dataset \(case 'case_001'\) but does not exist"}


def test_a_file_is_not_a_dataset(tmp_path):
    (tmp_path / "scan.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match=r"scan\.nii\.gz: expected a dataset folder, got a file"):
        load_dataset(tmp_path / "scan.nii.gz")
