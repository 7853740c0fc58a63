"""Bad input through the real CLI: one line naming the file and what was expected, a non-zero exit,
never a traceback. `check-dataset` lists file problems and exits 1; input it cannot even list
(a missing folder, a malformed dataset.json, an entry outside the dataset, an unknown task, an output
it cannot write) is an error: `error: ...` on stderr and exit 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import blob_case, make_grid

from medseg.cli import main
from medseg.io import write_image, write_label_map

GRID = make_grid(shape=(20, 18, 12))


def make_dataset(root: Path, cases: int = 2) -> Path:
    """A small valid MSD dataset on GRID."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(cases):
        image, labels = blob_case(GRID, seed=i)
        write_image(image, GRID, root / "imagesTr" / f"case_{i}.nii.gz")
        write_label_map(labels, GRID, root / "labelsTr" / f"case_{i}.nii.gz")
        training.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": "Pelvis", "training": training}))
    return root


@pytest.fixture
def dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "pelvis")


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as done:  # typer exits by itself when the command returns or raises Exit
        code = done.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(*args: str, cwd: Path) -> tuple[int, str, str]:
    done = subprocess.run([sys.executable, "-m", "medseg", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=60)
    return done.returncode, done.stdout, done.stderr


def assert_error(code: int, out: str, err: str, pattern: str) -> None:
    """An InputError: exit 2, one `error:` line on stderr, nothing else."""
    assert code == 2, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert err.count("\n") == 1, err
    assert re.fullmatch(f"error: {pattern}\n", err), err


def assert_problem(code: int, out: str, err: str, pattern: str) -> None:
    """A dataset problem: exit 1, the summary lists exactly this one problem as one line."""
    assert code == 1, (out, err)
    assert "Traceback" not in err + out and err == ""
    problems = [line for line in out.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 1, out
    assert re.fullmatch(f"problem: {pattern}", problems[0]), problems[0]
    assert out.splitlines()[-2:] == ["fingerprint not written: fix the problems first", "1 problem"]


# ------------------------------------------------------------------ files the check reports


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _text(path: Path) -> None:
    path.write_text("patient notes, not a scan\n")


def _two_d(path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((18, 20), np.int16)), str(path))


def _four_d(path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((*GRID.shape, 2), np.int16), GRID.ras_affine), path)


def _nan(path: Path) -> None:
    image = np.zeros(GRID.shape, np.float32)
    image[1, 2, 3], image[4, 5, 6] = np.nan, np.inf
    write_image(image, GRID, path)


IMAGE = r"imagesTr/case_1\.nii\.gz"


@pytest.mark.parametrize("break_image, pattern", [
    pytest.param(_empty, f"{IMAGE}: file is empty", id="empty"),
    pytest.param(_truncated, f"{IMAGE}: file is truncated or corrupt \\(its header promises 8992 bytes of header "
                 "and voxels, the file holds fewer\\)", id="truncated"),
    pytest.param(_text, f"{IMAGE}: not a readable image \\(truncated, corrupt or not NIfTI/NRRD/MHA/DICOM\\)",
                 id="not-an-image"),
    pytest.param(_two_d, f"{IMAGE}: expected a 3D image, got a 2D image of size \\(20, 18\\) "
                 "\\(a task for 2D images says `dimensions: 2`\\)", id="2d"),
    pytest.param(_four_d, f"{IMAGE}: expected a 3D image, got a 4D image of size \\(20, 18, 12, 2\\)", id="4d"),
    pytest.param(_nan, f"{IMAGE}: image has 2 NaN/inf voxels", id="nan-inf"),
])
def test_bad_image_is_listed(dataset, capsys, break_image, pattern):
    break_image(dataset / "imagesTr" / "case_1.nii.gz")
    assert_problem(*run_main(capsys, "check-dataset", str(dataset), "--out", str(dataset.parent / "fp.json")), pattern)


def test_grid_mismatch_is_listed(dataset, capsys):
    shifted = make_grid(shape=(20, 18, 12), origin=(0.0, 0.0, 0.0))
    write_label_map(blob_case(shifted)[1], shifted, dataset / "labelsTr" / "case_0.nii.gz")
    assert_problem(*run_main(capsys, "check-dataset", str(dataset), "-o", str(dataset.parent / "fp.json")),
                   r"labelsTr/case_0\.nii\.gz: label grid \(20x18x12 voxels at 1\.2x1\.1x2\.5 mm, orientation LPS\) "
                   r"differs from the image's \(20x18x12 voxels at 1\.2x1\.1x2\.5 mm, orientation LPS\)")


def test_label_outside_the_task_is_listed(dataset, capsys):
    labels = blob_case(GRID, seed=0)[1]
    labels[labels == 3] = 12
    write_label_map(labels, GRID, dataset / "labelsTr" / "case_0.nii.gz")
    assert_problem(*run_main(capsys, "check-dataset", str(dataset), "-o", str(dataset.parent / "fp.json")),
                   r"labelsTr/case_0\.nii\.gz: label value\(s\) 12 are not labels of task 'prostate' "
                   r"\(expected 0, 1, 2, 3, 4, 5\)")


def test_truncated_image_in_a_subprocess(dataset):
    """The real entry point, as a user runs it: the problem on stdout, nothing on stderr."""
    _truncated(dataset / "imagesTr" / "case_1.nii.gz")
    assert_problem(*run_subprocess("check-dataset", str(dataset), "-o", "fp.json", cwd=dataset.parent),
                   f"{IMAGE}: file is truncated or corrupt .*")
    assert not (dataset.parent / "fp.json").exists()


# ------------------------------------------------------------------------- InputError: exit 2


def test_missing_path(tmp_path):
    assert_error(*run_subprocess("check-dataset", str(tmp_path / "nowhere"), cwd=tmp_path),
                 re.escape(f"{tmp_path / 'nowhere'}: no such dataset folder"))


def test_malformed_dataset_json(dataset):
    (dataset / "dataset.json").write_text('{"training": [{"image": "./imagesTr/case_0.nii.gz",}]}')
    assert_error(*run_subprocess("check-dataset", str(dataset), cwd=dataset.parent),
                 re.escape(f"{dataset / 'dataset.json'}: not valid JSON (Expecting property name enclosed in double "
                           "quotes at line 1, column 52)"))


def test_dataset_json_without_training(dataset, capsys):
    (dataset / "dataset.json").write_text('{"name": "Pelvis"}')
    assert_error(*run_main(capsys, "check-dataset", str(dataset)),
                 re.escape(f"{dataset / 'dataset.json'}: has no 'training' list (MSD) nor 'channel_names' and "
                           "'file_ending' (nnU-Net v2)"))


def test_entry_outside_the_dataset(dataset, capsys):
    (dataset / "dataset.json").write_text(json.dumps(
        {"training": [{"image": "../../etc/shadow.nii.gz", "label": "./labelsTr/case_0.nii.gz"}]}))
    assert_problem(*run_main(capsys, "check-dataset", str(dataset)),  # one problem among all, not the end
                   re.escape("dataset.json: 'training[0].image' points outside the dataset folder: "
                             "../../etc/shadow.nii.gz"))


def test_unknown_task(dataset):
    assert_error(*run_subprocess("check-dataset", str(dataset), "--task", "prostrate", cwd=dataset.parent),
                 r"unknown task 'prostrate' \(available: .*prostate.*; or pass a path to a task \.yaml file\)")


def test_unwritable_output(dataset, capsys):
    blocker = dataset.parent / "results"
    blocker.write_text("a file where the output folder should be")
    assert_error(*run_main(capsys, "check-dataset", str(dataset), "--out", str(blocker / "fp.json")),
                 re.escape(f"cannot write {blocker / 'fp.json'}: {blocker} is a file, not a folder"))


# ------------------------------------------------------------------------------- valid dataset


def test_valid_dataset_passes(dataset, capsys):
    out = dataset.parent / "plans" / "fingerprint.json"
    code, stdout, err = run_main(capsys, "check-dataset", str(dataset), "--out", str(out))
    assert (code, err) == (0, "")
    assert stdout.splitlines()[-2:] == [f"fingerprint: {out}", "OK"]
    fingerprint = json.loads(out.read_text())
    assert fingerprint["num_cases"] == 2
    assert fingerprint["median_spacing"] == [1.2, 1.1, 2.5]
    assert fingerprint["median_shape"] == [20, 18, 12]
    assert len(fingerprint["foreground_intensity"]) == 1


def test_valid_dataset_with_two_problems_in_a_copy(dataset, capsys, tmp_path):
    """One corrupted image and one mismatched label: both listed, exit 1."""
    import shutil

    broken = Path(shutil.copytree(dataset, tmp_path / "broken"))
    _truncated(broken / "imagesTr" / "case_0.nii.gz")
    other = make_grid(shape=(20, 18, 12), spacing=(1.0, 1.0, 2.0))
    write_label_map(blob_case(other)[1], other, broken / "labelsTr" / "case_1.nii.gz")

    code, out, err = run_main(capsys, "check-dataset", str(broken), "-o", str(tmp_path / "fp.json"))

    assert code == 1 and err == ""
    problems = [line for line in out.splitlines() if line.startswith("problem: ")]
    assert [p.split(":")[1].strip() for p in problems] == ["imagesTr/case_0.nii.gz", "labelsTr/case_1.nii.gz"]
    assert "truncated or corrupt" in problems[0] and "label grid" in problems[1]
    assert out.splitlines()[-1] == "2 problems"
    assert run_main(capsys, "check-dataset", str(dataset), "-o", str(tmp_path / "fp.json"))[0] == 0


@pytest.mark.parametrize("command, allowed", [("train", "auto, bf16, fp32"), ("predict", "auto, bf16, fp32, int8")])
def test_unknown_precision(tmp_path, capsys, command, allowed):
    args = [command, "--precision", "fp16"] + ([str(tmp_path / "scan.nii.gz")] if command == "predict" else [])
    assert_error(*run_main(capsys, *args), rf"--precision 'fp16' is not one of {allowed}")
