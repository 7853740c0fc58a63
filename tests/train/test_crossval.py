"""Cross-validation: `medseg train --fold all` trains every fold, predicts the held-out cases, and chooses
the post-processing from them; run again, it retrains and re-predicts nothing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli import main
from medseg.train.crossval import choose_postprocessing

ORGANS = ["prostate", "bladder", "rectum", "femoral_head_left", "femoral_head_right"]


@pytest.fixture(scope="module")
def cv_folder(tiny_dataset, tmp_path_factory) -> Path:
    root, task = tiny_dataset
    folder = tmp_path_factory.mktemp("cv") / "cv"
    code = main(["train", "--task", str(task), "--data", str(root), "--folds", "2", "--fold", "all", "--epochs", "1",
                 "--out", str(folder), "--device", "cpu"])
    assert code == 0
    return folder


def test_every_fold_is_a_model_folder_holding_out_its_share(cv_folder, tiny_dataset):
    splits = [json.loads((cv_folder / f"fold_{k}" / "config.json").read_text()) for k in range(2)]
    assert [s["folds"] for s in splits] == [{"folds": 2, "fold": k, "seed": 0} for k in range(2)]
    held_out = [s["split"]["validation"] for s in splits]
    assert sorted(held_out[0] + held_out[1]) == [f"blob_{i}" for i in range(6)]  # each case out of fold once
    assert not set(held_out[0]) & set(held_out[1])
    assert all((cv_folder / f"fold_{k}" / "best.pt").is_file() for k in range(2))


def test_out_of_fold_predictions_lie_on_each_scans_grid(cv_folder, tiny_dataset):
    root, _ = tiny_dataset
    for i in range(6):
        image = sitk.ReadImage(str(root / "imagesTr" / f"blob_{i}.nii.gz"))
        for name in (f"blob_{i}_seg.nii.gz", f"blob_{i}_prob_bladder.nii.gz"):
            mask = sitk.ReadImage(str(cv_folder / "oof" / name))
            assert mask.GetSize() == image.GetSize()
            np.testing.assert_allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-4)
            np.testing.assert_allclose(mask.GetDirection(), image.GetDirection(), atol=1e-6)
        scores = json.loads((cv_folder / "oof" / f"blob_{i}.json").read_text())
        assert set(scores["organs"]) == set(ORGANS)
        assert {"dice_raw", "dice_largest", "mean_probability", "volume_ml"} <= set(scores["organs"]["bladder"])


def test_summary_has_dice_per_fold_mean_and_std_and_the_postprocessing_choice(cv_folder):
    summary = json.loads((cv_folder / "cv_summary.json").read_text())
    assert summary["folds"] == 2 and summary["cases"] == 6
    per_fold = [[summary["per_fold"][str(k)][organ]["dice"] for k in range(2)] for organ in ORGANS]
    for organ, values in zip(ORGANS, per_fold):
        values = [v for v in values if v is not None]
        if values:
            assert summary["organs"][organ]["mean"] == pytest.approx(np.mean(values), abs=1e-6)
            assert summary["organs"][organ]["std"] == pytest.approx(np.std(values), abs=1e-6)
    choice = json.loads((cv_folder / "postprocessing.json").read_text())
    assert choice == summary["postprocessing"] and choice["task_file"] == ["bladder"]
    for organ, decision in choice["organs"].items():
        if decision["cases"]:
            assert decision["enabled"] == (decision["dice_largest"] >= decision["dice_raw"])
            assert (organ in choice["largest_component"]) == decision["enabled"]
    with (cv_folder / "cv_summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["fold"] for r in rows} == {"0", "1", "mean", "std"}
    with (cv_folder / "cv_cases.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 6 * len(ORGANS)


def test_running_again_retrains_and_repredicts_nothing(cv_folder, tiny_dataset, capsys):
    root, task = tiny_dataset
    watched = [cv_folder / "fold_0" / "last.pt", cv_folder / "fold_1" / "best.pt", cv_folder / "oof" / "blob_0.json"]
    before = [p.stat().st_mtime_ns for p in watched]
    assert main(["train", "--task", str(task), "--data", str(root), "--folds", "2", "--fold", "all", "--epochs", "1",
                 "--out", str(cv_folder), "--device", "cpu"]) == 0
    assert [p.stat().st_mtime_ns for p in watched] == before
    assert "continuing" in capsys.readouterr().out


def test_a_fold_trained_on_predicts_its_held_out_cases_again(cv_folder):
    import os

    from medseg.train.crossval import summarise

    held_out = json.loads((cv_folder / "fold_1" / "config.json").read_text())["split"]["validation"]
    others = [f"blob_{i}" for i in range(6) if f"blob_{i}" not in held_out]
    before = {name: (cv_folder / "oof" / f"{name}.json").stat().st_mtime_ns for name in held_out + others}
    best = cv_folder / "fold_1" / "best.pt"
    os.utime(best, ns=(best.stat().st_atime_ns, best.stat().st_mtime_ns + 10**9))  # as if trained further
    summarise(cv_folder, device="cpu", echo=lambda line: None)
    after = {name: (cv_folder / "oof" / f"{name}.json").stat().st_mtime_ns for name in held_out + others}
    assert all(after[name] != before[name] for name in held_out)
    assert all(after[name] == before[name] for name in others)


def test_a_folder_of_other_folds_is_refused(cv_folder, tiny_dataset, capsys):
    root, task = tiny_dataset
    assert main(["train", "--task", str(task), "--data", str(root), "--folds", "3", "--fold", "all",
                 "--out", str(cv_folder)]) == 2
    assert "holds a cross-validation with --folds 2 --seed 0" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    pytest.param(["--fold", "first"], "--fold 'first' must be a fold number (0..4) or 'all'", id="not-a-number"),
    pytest.param(["--fold", "all", "--nproc", "2"], "--fold all trains the folds one after another", id="nproc"),
])
def test_bad_fold_arguments(arguments, message, capsys):
    assert main(["train", *arguments]) == 2
    assert message in capsys.readouterr().err


def result(case, **organs):
    return {"case": case, "fold": 0, "organs": {o: {"dice_raw": raw, "dice_largest": big} for o, (raw, big) in organs.items()}}


def test_largest_piece_is_chosen_where_it_does_not_lower_the_mean_out_of_fold_dice():
    results = [result("a", prostate=(0.8, 0.9), bladder=(0.9, 0.7), rectum=(0.5, 0.5), femoral_head_left=(None, None)),
               result("b", prostate=(0.6, 0.6), bladder=(0.9, 0.95), rectum=(0.7, 0.7))]
    choice = choose_postprocessing(results, ["prostate", "bladder", "rectum", "femoral_head_left"], ["bladder"])
    assert choice["largest_component"] == ["prostate", "rectum"]  # rectum: equal, so on
    assert choice["organs"]["prostate"] == {"enabled": True, "dice_raw": 0.7, "dice_largest": 0.75, "cases": 2}
    assert choice["organs"]["bladder"]["enabled"] is False  # 0.825 < 0.9
    assert choice["organs"]["femoral_head_left"] == {"enabled": False, "dice_raw": None, "dice_largest": None,
                                                     "cases": 0}


def test_confidence_thresholds_come_from_the_pooled_out_of_fold_cases(cv_folder, capsys):
    calibration = json.loads((cv_folder / "confidence.json").read_text())
    assert calibration["cases"] == [f"blob_{i}" for i in range(6)]  # every case, each out of fold once
    assert calibration["source"].startswith("out-of-fold predictions of 2 folds (6 cases")
    with (cv_folder / "cv_cases.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["organ"] == "bladder"]
    number = lambda text: float(text) if text else None
    bladder = calibration["organs"]["bladder"]
    assert dict(zip(bladder["case_names"], zip(bladder["confidence"], bladder["dice"]))) == {
        r["case"]: (number(r["mean_probability"]), number(r["dice"])) for r in rows}  # Dice as post-processed
    assert not (cv_folder / "fold_0" / "confidence.json").exists()  # the folds are not calibrated one by one
    (cv_folder / "confidence.json").unlink()
    assert main(["calibrate", str(cv_folder), "--device", "cpu"]) == 0  # again, from the predictions there
    captured = capsys.readouterr()
    assert "predicting" not in captured.err and "confidence thresholds from out-of-fold" in captured.out
    assert json.loads((cv_folder / "confidence.json").read_text())["organs"] == calibration["organs"]
    assert main(["calibrate", str(cv_folder), "--tta"]) == 2
    assert "a cross-validation folder is calibrated on its out-of-fold predictions" in capsys.readouterr().err
