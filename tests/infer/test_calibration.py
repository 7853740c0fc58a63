"""Per-organ confidence thresholds: the rule on hand-made cases, the file a real tiny training run writes,
`medseg calibrate` on an existing folder, and the QA flag naming the threshold that applied."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import blob_case, make_grid

from medseg.cli import main
from medseg.config import load_task
from medseg.data.datasets import load_dataset
from medseg.errors import InputError
from medseg.infer.calibration import (
    CALIBRATION_NAME,
    Calibration,
    calibrate_model,
    dice_fit,
    format_calibration,
    organ_threshold,
    read_calibration,
    reserve_seconds,
    score_case,
)
from medseg.infer.ensemble import EnsemblePredictor
from medseg.infer.predictor import Segmentation
from medseg.infer.qa import check_segmentation
from medseg.io import read_label, write_image, write_label_map
from medseg.model.folder import read_run_config

PROSTATE = load_task("prostate")


@pytest.mark.parametrize("confidences, dices, threshold, basis", [
    pytest.param([0.95, 0.96, 0.97, 0.961], [0.9, 0.88, 0.91, 0.4], 0.962, "highest confidence of 1 case(s) with Dice",
                 id="a-confident-failure-sets-it"),
    pytest.param([0.92, 0.93, 0.94, 0.95, 0.96], [0.8] * 5, 0.925, "10th percentile of 5 good cases (0.924)",
                 id="no-failure-the-10th-percentile"),
    pytest.param([0.95, 0.96, 0.97, 0.60], [0.9, 0.88, 0.91, 0.2], 0.953, "10th percentile of 3 good cases",
                 id="a-timid-failure-the-percentile-still-wins"),
    pytest.param([0.70, 0.72, 0.74], [0.8, 0.9, 0.85], 0.705, "10th percentile", id="an-organ-always-below-0.8"),
    pytest.param([0.87, 0.95, 0.96], [0.3, 0.9, 0.9], 0.871, "(0.870)", id="strictly-above-the-failure"),
    pytest.param([0.6], [0.3], 0.8, "the default 0.8 (fewer than 3 good cases)", id="one-timid-failure-the-default"),
    pytest.param([0.97], [0.2], 0.971, "highest confidence of 1 case(s)", id="one-confident-failure"),
    pytest.param([0.995, 0.9], [0.1, 0.9], 0.99, "capped at 0.99", id="capped"),
    pytest.param([0.9, 0.95], [0.8, 0.9], None, "2 case(s), none bad: too few", id="two-good-cases-too-few"),
    pytest.param([None, 0.9, 0.95, 0.93], [0.0, None, 0.9, 0.8], None, "2 case(s), none bad",
                 id="not-predicted-or-absent-left-out"),
    pytest.param([], [], None, "no validation case", id="no-case"),
    pytest.param([0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 0.93, 0.94, 0.95], [0.1, 0.2, 0.3, 0.4, 0.45, 0.3, 0.9, 0.9, 0.9],
                 0.946, "90th percentile of 6 case(s) with Dice < 0.5 (0.945)", id="many-failures-a-percentile"),
    pytest.param([0.99, 0.92, 0.93, 0.94], [0.6, 0.9, 0.8, 0.75], 0.923, "10th percentile of 3 good cases (0.922)",
                 id="a-middling-case-is-no-failure"),
])
def test_the_rule_on_hand_made_cases(confidences, dices, threshold, basis):
    chosen, why = organ_threshold(confidences, dices)
    assert chosen == threshold
    assert basis in why


def test_an_organ_without_a_threshold_falls_back_to_the_default():
    calibration = Calibration({"bladder": {"threshold": 0.93, "cases": 12, "basis": "..."},
                               "rectum": {"threshold": None, "cases": 2, "basis": "2 case(s), none bad"}}, "test")
    assert calibration.threshold("bladder") == (0.93, "the organ's threshold from 12 validation cases")
    assert calibration.threshold("rectum") == (0.8, "the default; the calibration has 2 case(s), none bad")
    assert calibration.threshold("prostate")[0] == 0.8


def test_qa_flags_below_the_organs_threshold_and_names_it():
    grid = make_grid("LPS")
    _, labels = blob_case(grid)
    confidence = {"bladder": 0.85, "rectum": 0.75, "prostate": 0.78, "femoral_head_left": 0.97}
    seg = Segmentation(labels, grid, PROSTATE.label_names,
                       confidence={k: {"mean_probability": v} for k, v in confidence.items()})
    calibration = Calibration({"bladder": {"threshold": 0.87, "cases": 12}, "rectum": {"threshold": 0.7, "cases": 9},
                               "femoral_head_left": {"threshold": 0.98, "cases": 5}}, "test")
    flags = {f.organ: f.reason for f in check_segmentation(seg, PROSTATE, None, calibration=calibration)}
    assert "rectum" not in flags  # below the global 0.8, above its own 0.7
    assert flags["bladder"] == ("low confidence 0.85 (mean probability where it is predicted; flagged below 0.87, "
                                "the organ's threshold from 12 validation cases)")
    assert "flagged below 0.98, the organ's threshold from 5 validation cases" in flags["femoral_head_left"]
    assert "flagged below 0.8, the default; the calibration does not cover this organ" in flags["prostate"]
    without = {f.organ: f.reason for f in check_segmentation(seg, PROSTATE, None)}
    assert set(without) == {"rectum", "prostate"}
    assert without["rectum"].endswith("flagged below 0.8, the default; the model has no calibration "
                                      "(`medseg calibrate`))")


def test_the_dice_line_on_hand_made_cases():
    scores = [0.5, 0.6, 0.7, 0.8, 0.9, 0.5, 0.6, 0.7, 0.8, 0.9, None]
    dices = [0.3, 0.4, 0.5, 0.6, 0.7, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9]  # Dice = score - 0.2; the None is left out
    assert dice_fit(scores, dices) == {"intercept": pytest.approx(-0.2), "slope": pytest.approx(1.0), "cases": 10}
    falling = dice_fit(scores[:10], dices[::-1][1:])  # surer, worse: no slope, the organ's mean Dice
    assert falling["slope"] == 0.0 and falling["intercept"] == pytest.approx(0.5)
    assert dice_fit(scores[:9], dices[:9]) is None  # under 10 cases
    calibration = Calibration({"esophagus": {"threshold": 0.9, "dice_fit": {"intercept": -0.5, "slope": 1.2}},
                               "mandible": {"threshold": 0.9}}, "test")
    assert calibration.estimated_dice("esophagus", 0.9) == pytest.approx(0.58)
    assert calibration.estimated_dice("esophagus", 0.3) == 0.0  # kept within [0, 1]
    assert calibration.estimated_dice("mandible", 0.9) is None  # no line fitted
    assert calibration.estimated_dice("esophagus", None) is None  # predicted nowhere
    lines = format_calibration({"source": "test", "organs": {
        "esophagus": {"threshold": 0.9, "cases": 12, "basis": "b", "dice_fit": {"intercept": -0.5, "slope": 1.2,
                                                                                 "cases": 12}},
        "mandible": {"threshold": None, "cases": 2, "basis": "b", "dice_fit": None}}})
    assert lines[2].split() == "estimated Dice = -0.500 + 1.200 x expected Dice (12 cases)".split()
    assert len(lines) == 4  # no line for the mandible: none fitted


# ------------------------------------------------------------------------- a real tiny training run


def test_training_writes_the_calibration_of_its_validation_cases(tiny_model, tiny_dataset):
    config = read_run_config(tiny_model)
    calibration = json.loads((tiny_model / CALIBRATION_NAME).read_text())
    unseen = [n for n in config.split["validation"] if n not in config.split["train"]]
    assert unseen and calibration["cases"] == sorted(unseen)
    assert calibration["tta"] is False and calibration["default"] == 0.8 and calibration["seconds"] > 0
    assert set(calibration["organs"]) == set(config.task.label_names.values())
    for entry in calibration["organs"].values():  # the stored cases give back the stored threshold
        assert entry["case_names"] == unseen
        assert organ_threshold(entry["confidence"], entry["dice"]) == (entry["threshold"], entry["basis"])
        assert entry["threshold"] is None or 0 < entry["threshold"] <= 0.99
    # the values are what `medseg predict -m MODEL --uncertainty` computes for that case (through torch, as
    # training calibrates; OpenVINO, which predict takes on a CPU where installed, differs in the 4th digit)
    case = next(c for c in load_dataset(tiny_dataset[0]) if c.name == unseen[0])
    for backend, digits in (("torch", 6), ("auto", 2)):
        seg = EnsemblePredictor([tiny_model], device="cpu", uncertainty=True, backend=backend).predict(list(case.images))
        for row in score_case(seg, read_label(case.label)[0], case.name, None):
            entry = calibration["organs"][row["organ"]]
            for key in ("confidence", "dice"):  # None: not predicted, or absent from both masks
                assert (entry[key][0] is None) == (row[key] is None)
                assert row[key] is None or entry[key][0] == pytest.approx(row[key], abs=10**-digits)
    loaded = read_calibration(tiny_model)
    assert loaded.organs["bladder"]["threshold"] == calibration["organs"]["bladder"]["threshold"]
    for entry in calibration["organs"].values():  # the line, where fitted, comes back from the stored cases
        assert entry["dice_fit"] == dice_fit(entry["expected_dice"], entry["dice"])


def test_the_reserve_holds_the_calibration(tiny_model):
    config = read_run_config(tiny_model)
    validated = len(config.split["validation"][:config.task.schedule.validation_cases])
    unseen = len(set(config.split["validation"]) - set(config.split["train"]))
    assert unseen > 0 and reserve_seconds(10.0, config) == pytest.approx(10.0 / validated * (unseen + 1) * 2.0)


@pytest.fixture
def model(tiny_model, tmp_path) -> Path:
    """A copy of the tiny model without its calibration."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("cache", "tensorboard", CALIBRATION_NAME))
    return folder


def test_medseg_calibrate_on_an_existing_folder(model, tiny_dataset, capsys):
    assert read_calibration(model) is None
    assert main(["calibrate", str(model), "--data", str(tiny_dataset[0]), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    cases = len(read_run_config(model).split["validation"])
    assert f"wrote {model / CALIBRATION_NAME}" in captured.out
    assert f"confidence thresholds from {cases} validation case(s) of the run's split" in captured.out
    assert f"calibrating confidence on {cases} validation case(s)" in captured.err  # then one line per case
    written = json.loads((model / CALIBRATION_NAME).read_text())
    assert written["organs"]["bladder"]["cases"] == cases
    assert read_calibration(model).threshold("bladder")[0] == (written["organs"]["bladder"]["threshold"] or 0.8)


def test_calibration_needs_the_validation_cases_and_unseen_ones(model, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    grid = make_grid("LPS", shape=(20, 20, 10))
    image, labels = blob_case(grid)
    write_image(image, grid, other / "imagesTr" / "x.nii.gz")
    write_label_map(labels, grid, other / "labelsTr" / "x.nii.gz")
    (other / "dataset.json").write_text(json.dumps({"name": "x", "labels": {"0": "background"}, "training": [
        {"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]}))
    assert main(["calibrate", str(model), "--data", str(other), "--device", "cpu"]) == 2
    assert f"error: {other}: lacks the labelled validation case(s) blob_" in capsys.readouterr().err
    config = json.loads((model / "config.json").read_text())
    config["split"]["train"] += config["split"]["validation"]  # a run of one case validates on its training case
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="no validation case that the model did not train on"):
        calibrate_model(model, device="cpu")
    assert not (model / CALIBRATION_NAME).exists()


def test_predict_flags_with_the_models_thresholds_and_estimates_dice_on_its_lines(model, tmp_path):
    calibration = {"source": "test", "tta": False,
                   "organs": {"bladder": {"threshold": 0.99, "cases": 7, "basis": "test",
                                          "dice_fit": {"intercept": 0.1, "slope": 0.8}}}}
    (model / CALIBRATION_NAME).write_text(json.dumps(calibration))
    grid = make_grid("LPS", shape=(44, 40, 20), spacing=(1.5, 1.4, 3.0))
    scan = write_image(blob_case(grid, seed=3)[0], grid, tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    assert main(["predict", str(scan), "-m", str(model), "-o", str(out), "--uncertainty", "--no-overlays",
                 "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["qa"]["confidence_calibration"] == {"source": "test", "tta": False, "thresholds": {"bladder": 0.99}}
    confidence = summary["cases"][0]["confidence"]
    bladder = [f for f in summary["flags"] if f["check"] == "confidence" and f["organ"] == "bladder"]
    assert bool(bladder) == (confidence["bladder"] is not None and confidence["bladder"] < 0.99)
    for flag in bladder:
        assert "flagged below 0.99, the organ's threshold from 7 validation cases" in flag["reason"]
    for flag in (f for f in summary["flags"] if f["check"] == "confidence" and f["organ"] != "bladder"):
        assert "flagged below 0.8, the default" in flag["reason"]
    # the estimate: only for the organ with a line, the line at the organ's expected Dice
    volumes = json.loads((out / "scan_volumes.json").read_text())["organs"]
    assert volumes["bladder"]["voxels"] > 0 and set(summary["cases"][0]["estimated_dice"]) == {"bladder"}
    expected = EnsemblePredictor([model], device="cpu", uncertainty=True).predict(str(scan)).confidence["bladder"]
    assert summary["cases"][0]["estimated_dice"]["bladder"] == volumes["bladder"]["estimated_dice"] == \
        pytest.approx(0.1 + 0.8 * expected["expected_dice"], abs=0.01)
    assert all("estimated_dice" not in entry for organ, entry in volumes.items() if organ != "bladder")
