"""`medseg evaluate` end to end on real .nii.gz files, and the file-level API under it."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import blob_case, make_grid

from medseg.cli import main
from medseg.config import CASE_ORGAN
from medseg.errors import InputError
from medseg.evaluate.cases import ORGAN_METRICS, evaluate_pairs
from medseg.io import write_label_map

PROSTATE_ORGANS = ["prostate", "bladder", "rectum", "femoral_head_left", "femoral_head_right"]


def run_cli(args: list[str]) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as done:  # typer exits itself on success
        return done.code or 0


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_cli_end_to_end_with_task(folders, tmp_path, capsys):
    preds, refs = folders
    out = tmp_path / "evaluation"
    assert run_cli(["evaluate", "--pred", preds, "--ref", refs, "--task", "prostate", "-o", out]) == 0
    captured = capsys.readouterr()

    assert {p.name for p in out.iterdir()} == {"metrics.csv", "summary.json", "dice_boxplot.png", "slices.csv",
                                               "profiles"}
    assert {p.name for p in (out / "profiles").iterdir()} == {"case_0.png", "case_1.png"}
    assert (out / "dice_boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_csv(out / "metrics.csv")
    assert list(rows[0]) == ["case", "organ", "metric", "value"]
    assert {r["case"] for r in rows} == {"case_0", "case_1"}  # `_seg` stripped, strays skipped
    assert {r["organ"] for r in rows} == {*PROSTATE_ORGANS, CASE_ORGAN}
    assert len(rows) == 2 * (5 * len(ORGAN_METRICS) + 2)
    values = {(r["case"], r["organ"], r["metric"]): float(r["value"]) for r in rows}
    assert 0.5 < values["case_0", "bladder", "dice"] < 1
    assert values["case_1", "rectum", "dice"] == 0 and math.isinf(values["case_1", "rectum", "hd95_mm"])

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {*PROSTATE_ORGANS, CASE_ORGAN}
    assert set(summary["prostate"]["dice"]) == {"mean", "std", "median", "n", "n_empty", "n_inf"}
    assert summary["rectum"]["hd95_mm"]["n_inf"] == 1 and summary["rectum"]["hd95_mm"]["n"] == 1

    # one warning line names the partnerless files; the table names every organ
    warning = [line for line in captured.err.splitlines() if line.startswith("warning")]
    assert len(warning) == 1 and "stray" in warning[0] and "case_2" in warning[0]
    for organ in PROSTATE_ORGANS:
        assert organ in captured.out


@pytest.mark.parametrize("mapping", [
    pytest.param({"0": "background", "1": "gland", "2": "vesica"}, id="id-to-name"),
    pytest.param({"labels": {"background": 0, "gland": 1, "vesica": 2}}, id="nnunet-name-to-id"),
])
def test_cli_labels_file(folders, tmp_path, mapping):
    preds, refs = folders
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(mapping))
    out = tmp_path / "evaluation"
    assert run_cli(["evaluate", "--pred", preds, "--ref", refs, "--labels", labels, "-o", out]) == 0
    assert set(json.loads((out / "summary.json").read_text())) == {"gland", "vesica", CASE_ORGAN}


def test_cli_without_names_uses_label_values(folders, tmp_path):
    preds, refs = folders
    out = tmp_path / "evaluation"
    assert run_cli(["evaluate", "--pred", preds, "--ref", refs, "-o", out]) == 0
    assert set(json.loads((out / "summary.json").read_text())) == {f"label_{i}" for i in range(1, 6)} | {CASE_ORGAN}


def test_cli_two_files(folders, tmp_path):
    preds, refs = folders
    out = tmp_path / "evaluation"
    assert run_cli(["evaluate", "-p", preds / "case_0_seg.nii.gz", "-r", refs / "case_0.nii.gz", "-t", "prostate",
                    "-o", out]) == 0
    assert {r["case"] for r in read_csv(out / "metrics.csv")} == {"case_0"}


def test_cli_grid_mismatch_is_a_one_line_error_naming_both_files(folders, tmp_path, capsys):
    preds, refs = folders
    labels = blob_case(make_grid("LPS", shape=(40, 36, 24)), 0)[1]
    write_label_map(labels, make_grid("LPS", shape=(40, 36, 24), spacing=(1.2, 1.1, 3.0)), preds / "case_0_seg.nii.gz")
    out = tmp_path / "evaluation"
    assert run_cli(["evaluate", "--pred", preds, "--ref", refs, "--task", "prostate", "-o", out]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error:") and "case_0_seg.nii.gz" in error and "case_0.nii.gz" in error
    assert "spacing" in error
    assert not (out / "metrics.csv").exists()


def test_cli_no_match_and_conflicting_options(folders, tmp_path, capsys):
    preds, refs = folders
    empty_refs = tmp_path / "other"
    write_label_map(np.zeros((4, 4, 4), np.uint8), make_grid(shape=(4, 4, 4)), empty_refs / "unrelated.nii.gz")
    assert run_cli(["evaluate", "--pred", preds, "--ref", empty_refs]) == 2
    assert "no prediction" in capsys.readouterr().err
    labels = tmp_path / "labels.json"
    labels.write_text('{"1": "prostate"}')
    assert run_cli(["evaluate", "--pred", preds, "--ref", refs, "--task", "prostate", "--labels", labels]) == 2


def test_grid_mismatch_in_the_api(tmp_path):
    labels = np.zeros((8, 8, 8), np.uint8)
    ref = write_label_map(labels, make_grid(shape=(8, 8, 8)), tmp_path / "a.nii.gz")
    pred = write_label_map(labels, make_grid(shape=(8, 8, 8), origin=(0, 0, 0)), tmp_path / "a_seg.nii.gz")
    with pytest.raises(InputError, match=r"a_seg\.nii\.gz and .*a\.nii\.gz: .*origin"):
        evaluate_pairs([("a", pred, ref)], {1: "prostate"})


def test_dataset_reference_skips_uncontoured_organs(folders, tmp_path, capsys):
    """--ref a dataset folder: case_1 did not contour the rectum (its prediction misses it too), so the
    rectum is scored on case_0 alone; organ names come from the dataset.json."""
    preds, refs = folders
    root = tmp_path / "dataset"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    entries = []
    for seed in range(3):
        (root / "labelsTr" / f"case_{seed}.nii.gz").write_bytes((refs / f"case_{seed}.nii.gz").read_bytes())
        (root / "imagesTr" / f"case_{seed}.nii.gz").write_bytes((refs / f"case_{seed}.nii.gz").read_bytes())
        entry = {"image": f"./imagesTr/case_{seed}.nii.gz", "label": f"./labelsTr/case_{seed}.nii.gz"}
        if seed == 1:
            entry["contoured"] = [o for o in PROSTATE_ORGANS if o != "rectum"]
        entries.append(entry)
    labels = {"0": "background", **{str(i): name for i, name in enumerate(PROSTATE_ORGANS, start=1)}}
    (root / "dataset.json").write_text(json.dumps({"labels": labels, "training": entries}))
    out = tmp_path / "evaluation"

    assert run_cli(["evaluate", "--pred", preds, "--ref", root, "-o", out]) == 0
    rows = read_csv(out / "metrics.csv")
    assert {(r["case"], r["organ"]) for r in rows if r["metric"] == "dice"} == {
        *((case, organ) for case in ("case_0", "case_1") for organ in PROSTATE_ORGANS)} - {("case_1", "rectum")}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rectum"]["dice"]["n"] == 1 and summary["bladder"]["dice"]["n"] == 2
    assert "stray" in capsys.readouterr().err  # a prediction without a case is still reported
    assert "case_2" not in {r["case"] for r in rows}  # a dataset case without a prediction is not an error




def test_surface_dice_tolerance_from_the_task_file_and_the_fallback_marked(folders, tmp_path, capsys):
    """prostate gets 0.5 mm from the task file (less than the 1.2 mm shift of the predictions); the other organs
    the 2 mm fallback, marked as such."""
    preds, refs = folders
    task = tmp_path / "pelvis.yaml"
    task.write_text("name: pelvis\nlabels:\n  1: {name: prostate, tolerance_mm: 0.5}\n  2: bladder\n")
    out = tmp_path / "evaluation"
    assert run_cli(["evaluate", "--pred", preds, "--ref", refs, "--task", task, "-o", out]) == 0
    summary = json.loads((out / "summary.json").read_text())
    prostate, bladder = summary["prostate"]["surface_dice"], summary["bladder"]["surface_dice"]
    assert (prostate["tolerance_mm"], prostate["tolerance_source"]) == (0.5, "task file")
    assert (bladder["tolerance_mm"], bladder["tolerance_source"]) == (2.0, "fallback 2 mm")

    from medseg.evaluate.cases import evaluate_case
    from medseg.io import read_label

    expected = []
    for case in ("case_0", "case_1"):
        (ref, grid), (pred, _) = read_label(refs / f"{case}.nii.gz"), read_label(preds / f"{case}_seg.nii.gz")
        rows = evaluate_case(ref, pred, grid.spacing, {1: "prostate"}, tolerance_mm=0.5)
        expected.append(next(r["value"] for r in rows if r["metric"] == "surface_dice"))
    assert prostate["mean"] == pytest.approx(np.mean(expected)) and prostate["mean"] < bladder["mean"] == 1.0
    table = capsys.readouterr().out
    assert "0.50" in table.split("prostate")[1].splitlines()[0] and "2.00*" in table.split("bladder")[1].splitlines()[0]
    assert "* surface Dice tolerance: the 2 mm fallback" in table
