"""QA flags: a scan unlike the training data is flagged organ by organ, each with its reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import blob_case, make_grid, oracle_predictor
from scipy import ndimage

from medseg.cli import main
from medseg.config import load_task
from medseg.data.datasets import load_dataset
from medseg.data.fingerprint import compute_fingerprint
from medseg.infer.predictor import Segmentation
from medseg.infer.qa import Checker, TrainingStats, check_segmentation, format_flags, skipped_checks
from medseg.io import write_image

PROSTATE = load_task("prostate")
LEGACY_RUN = Path(__file__).parents[1] / "fixtures" / "run_v0_1"


@pytest.fixture
def stats(msd) -> TrainingStats:
    """What a model trained on three ordinary blob cases saw (LPS and PLI scans)."""
    return TrainingStats.from_fingerprints([compute_fingerprint(load_dataset(msd), PROSTATE)])


def unlike_training(grid) -> np.ndarray:
    """An ordinary blob case gone wrong: mirrored left-right (the left femoral head on the patient's right),
    bladder swollen, no rectum, and a second piece of prostate away from the first."""
    _, labels = blob_case(grid, seed=5)
    labels = labels[::-1].copy()  # voxel axis 0 is LPS x: the mirror image
    swollen = ndimage.binary_dilation(labels == 2, iterations=3) & (labels == 0)
    labels[swollen] = 2
    labels[labels == 3] = 0
    labels[1:7, 1:7, 1:5] = 1
    return labels


def test_a_scan_unlike_training_is_flagged_organ_by_organ_with_reasons(stats):
    grid = make_grid("LPS")
    labels = unlike_training(grid)
    # the oracle network reads each voxel's label off its value: the prediction is the scan's anatomy
    seg = oracle_predictor(grid.spacing).predict((labels[None].astype(np.float32), grid))
    flags = check_segmentation(seg, PROSTATE, stats, kept_largest=PROSTATE.inference.largest_component)
    by_organ = {(f.organ, f.check): f.reason for f in flags}

    assert set(by_organ) == {("femoral_head_left", "side"), ("femoral_head_right", "side"), ("rectum", "missing"),
                             ("bladder", "volume"), ("prostate", "pieces")}
    assert "lies on the patient's right of femoral_head_right" in by_organ[("femoral_head_left", "side")]
    assert "lies on the patient's left of femoral_head_left" in by_organ[("femoral_head_right", "side")]
    assert by_organ[("rectum", "missing")].startswith("not found (training had it in 3 of 3 cases), although the "
                                                      "scan covers its usual position")
    assert "is above anything in training (max" in by_organ[("bladder", "volume")]
    assert by_organ[("prostate", "pieces")].startswith("2 separate pieces (")
    assert "only the largest was kept" in by_organ[("prostate", "pieces")]
    assert [f.severity for f in flags] == sorted((f.severity for f in flags), reverse=True)  # worst first
    assert flags[0].severity == 3.0  # a wrong side, or a volume twice beyond the range


def test_an_ordinary_case_has_no_flags(stats):
    grid = make_grid("LPS")
    _, labels = blob_case(grid, seed=7)
    seg = oracle_predictor(grid.spacing).predict((labels[None].astype(np.float32), grid))
    assert check_segmentation(seg, PROSTATE, stats, PROSTATE.inference.largest_component) == []


def test_nothing_found_at_all_flags_every_expected_organ(stats):
    grid = make_grid("LPS")
    seg = Segmentation(np.zeros(grid.shape, np.uint8), grid, PROSTATE.label_names)
    flags = check_segmentation(seg, PROSTATE, stats)
    assert {f.organ for f in flags} == set(PROSTATE.label_names.values()) and {f.check for f in flags} == {"missing"}
    assert "nor any other organ" in flags[0].reason


def test_an_organ_the_scan_does_not_reach_is_outside_the_field_of_view_not_missing(stats):
    """The same case twice without its right femoral head (patient's right: low LPS x): cropped from the
    side so the scan ends before where that head lies, it is a note; with the scan reaching there, missing."""
    grid = make_grid("LPS")
    _, labels = blob_case(grid, seed=7)
    head = np.nonzero((labels == 5).any(axis=(1, 2)))[0]
    box = (slice(int(head.max()) + 2, grid.shape[0]), slice(0, grid.shape[1]), slice(0, grid.shape[2]))
    cropped = Segmentation(labels[box].copy(), grid.crop(box), PROSTATE.label_names)
    assert not (cropped.labels == 5).any() and (cropped.labels == 4).any()

    (note,) = check_segmentation(cropped, PROSTATE, stats)
    assert (note.organ, note.check, note.severity) == ("femoral_head_right", "outside", 0.0)
    assert note.reason.startswith("not found, and its usual position lies outside the scan's field of view (R-L: x ")
    assert note.reason.endswith("; not flagged missing") and "\n" not in note.reason
    expected_x = float(note.reason.split("(R-L: x ")[1].split(" mm")[0])
    assert expected_x < grid.crop(box).origin[0] - 3  # well beyond the scan's first voxel along x

    absent = np.where(labels == 5, 0, labels).astype(np.uint8)  # the whole width: the scan reaches there
    (flag,) = check_segmentation(Segmentation(absent, grid, PROSTATE.label_names), PROSTATE, stats)
    assert (flag.organ, flag.check, flag.severity) == ("femoral_head_right", "missing", 2.5)
    assert flag.reason.startswith("not found (training had it in 3 of 3 cases), although the scan covers its usual "
                                  "position, x ")
    assert "only" not in flag.reason  # all three axes known


def test_outside_notes_are_counted_apart_from_flags():
    note = {"organ": "femoral_head_right", "check": "outside", "reason": "not found, ...", "severity": 0.0}
    flag = {"organ": "rectum", "check": "missing", "reason": "not found (...)", "severity": 2.5}
    rows = [{"case": "a", "flags": [note]}, {"case": "b", "flags": [flag, note]}, {"case": "c", "flags": []}]
    assert Checker.closing_line(rows) == ("QA: 1 flag in 1 of 3 cases; 2 organs outside the field of view (worst "
                                          "first in summary.json and at the top of review.html)")
    assert Checker.closing_line(rows[:1]) == "QA: no flags; 1 organ outside the field of view"
    assert format_flags("a", [note, flag]) == ["  note a / femoral_head_right [outside]: not found, ...",
                                               "  flag a / rectum [missing]: not found (...)"]


def test_statistics_with_only_the_head_foot_offset_check_head_foot_alone(stats):
    """A model folder from before the R-L and A-P offsets: the cropped case is flagged missing, as before."""
    old = TrainingStats({organ: {k: v for k, v in entry.items() if k not in ("offset_rl_mm", "offset_ap_mm")}
                         for organ, entry in stats.organs.items()})
    grid = make_grid("LPS")
    _, labels = blob_case(grid, seed=7)
    box = (slice(16, grid.shape[0]), slice(0, grid.shape[1]), slice(0, grid.shape[2]))
    (flag,) = check_segmentation(Segmentation(labels[box].copy(), grid.crop(box), PROSTATE.label_names), PROSTATE, old)
    assert (flag.organ, flag.check) == ("femoral_head_right", "missing")
    assert flag.reason.endswith("mm from the other organs' centre; only S-I known from training)")
    assert "head-foot only" in skipped_checks(old, with_confidence=True)[0]
    assert skipped_checks(stats, with_confidence=True) == []


def test_a_left_organ_without_its_partner_is_flagged_only_well_on_the_wrong_side():
    grid = make_grid("LPS", shape=(60, 36, 24))
    _, labels = blob_case(grid)
    alone = np.where(labels == 4, 0, np.where(labels == 5, 4, labels)).astype(np.uint8)  # 'left' where right is
    (flag,) = check_segmentation(Segmentation(alone, grid, PROSTATE.label_names), PROSTATE, None)
    assert (flag.organ, flag.check) == ("femoral_head_left", "side")
    assert flag.reason.startswith("lies on the patient's right (centre x ")
    near = np.where(labels == 5, 0, labels).astype(np.uint8)
    near[labels == 4] = 0
    near[np.roll(labels == 1, 3, axis=0) & (near == 0)] = 4  # just beside the midline organs: no call either way
    assert check_segmentation(Segmentation(near, grid, PROSTATE.label_names), PROSTATE, None) == []


def test_low_confidence_is_flagged_with_the_threshold():
    grid = make_grid("LPS")
    _, labels = blob_case(grid)
    seg = Segmentation(labels, grid, PROSTATE.label_names,
                       confidence={"bladder": {"mean_probability": 0.55}, "rectum": {"mean_probability": 0.95}})
    (flag,) = check_segmentation(seg, PROSTATE, None)
    assert (flag.organ, flag.check) == ("bladder", "confidence")
    assert flag.reason.startswith("low confidence 0.55 (mean probability where it is predicted; flagged below 0.8")


def test_a_model_folder_without_organ_statistics_skips_those_checks(tmp_path, capsys):
    fingerprint = json.loads((LEGACY_RUN / "config.json").read_text())["fingerprint"]
    assert TrainingStats.from_fingerprints([fingerprint]) is None
    assert "no organ statistics" in skipped_checks(None, with_confidence=False)[0]
    grid = make_grid("RAS", shape=(36, 36, 16), spacing=(1.5, 1.5, 3.0))
    scan = write_image(blob_case(grid, seed=5)[0], grid, tmp_path / "scan.nii.gz")
    model = tmp_path / "legacy"  # a copy: a backend may cache a converted network in the model folder
    shutil.copytree(LEGACY_RUN, model)
    assert main(["predict", str(scan), "-m", str(model), "-o", str(tmp_path / "out"), "--no-overlays",
                 "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert any("no organ statistics" in line for line in summary["qa"]["skipped"])


def test_flags_reach_the_terminal_summary_json_and_the_top_of_the_review_page(tiny_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("cache", "tensorboard"))
    config = json.loads((model / "config.json").read_text())
    for entry in config["fingerprint"]["organ_statistics"].values():  # training as if every organ were tiny
        entry["volume_ml"] = {"min": 0.001, "p01": 0.001, "p50": 0.002, "p99": 0.002, "max": 0.002}
    (model / "config.json").write_text(json.dumps(config))
    grid = make_grid("LPS", shape=(44, 40, 20), spacing=(1.5, 1.4, 3.0))
    scan = write_image(blob_case(grid, seed=7)[0], grid, tmp_path / "odd.nii.gz")
    out = tmp_path / "out"
    assert main(["predict", str(scan), "-m", str(model), "-o", str(out), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    volume_flags = [f for f in summary["flags"] if f["check"] == "volume"]
    assert volume_flags and all(f["case"] == "odd" and "above anything in training" in f["reason"]
                                for f in volume_flags)
    assert [f["severity"] for f in summary["flags"]] == sorted((f["severity"] for f in summary["flags"]), reverse=True)
    assert f"flag odd / {volume_flags[0]['organ']} [volume]: volume" in err
    assert "QA: " in err and "flags in 1 of 1 cases" in err
    assert summary["cases"][0]["flags"] == json.loads((out / "odd_volumes.json").read_text())["flags"]
    page = (out / "review.html").read_text()
    assert page.index('<table id="flags">') < page.index('<table id="cases">')  # at the top
    assert page.count('<tr class="flag" data-flag-case="odd">') == len(summary["flags"])


def test_a_2d_image_is_checked_by_area_worded_in_um2(nuclei):
    """Microscopy (0.5 um pixels): training's nuclei are 49-79 um2; a 4x larger nucleus in two pieces is
    flagged for its area and its pieces, in um2 (not '0.0 mL'), the pieces judged against the typical size."""
    from conftest import disc

    root, task_file = nuclei
    task = load_task(task_file)
    stats = TrainingStats.from_fingerprints([compute_fingerprint(load_dataset(root), task)])
    grid = make_grid("LPS", shape=(64, 64, 1), spacing=(0.0005, 0.0005, 1.0), origin=(0.0, 0.0, 0.0))
    labels = (disc((64, 64), (24, 30), 18) | disc((64, 64), (56, 56), 6)).astype(np.uint8)[..., None]
    seg = Segmentation(labels, grid, task.label_names)
    by_check = {f.check: f.reason for f in check_segmentation(seg, task, stats)}

    assert set(by_check) == {"volume", "pieces"}
    area_um2 = labels.sum() * 0.25
    assert by_check["volume"] == (f"area {area_um2:.0f} µm² is above anything in training (max 79.2 µm² over 3 "
                                  "cases; 1st-99th percentile 49.5-78.9 µm²)")  # discs of 197, 253, 317 pixels
    assert disc((64, 64), (24, 30), 18).sum() == 1009 and disc((64, 64), (56, 56), 6).sum() == 113
    assert by_check["pieces"] == "2 separate pieces (252, 28.2 µm²) where training had one"

    scattered = np.zeros_like(labels)
    scattered[10:14, 10:15] = 1  # 20 pixels, 5 um2
    scattered[40, 40:42] = 1  # 0.5 um2: 10 % of the largest piece, but under 1 % of training's median nucleus
    (flag,) = check_segmentation(Segmentation(scattered, grid, task.label_names), task, stats)
    assert flag.check == "volume" and flag.reason.startswith("area 5.5 µm² is below anything in training (min 49.2 µm²")

    # a 2D model folder from before areas were stored: sizes rounded to 0 mL, every organ "one piece"
    old = TrainingStats({"nucleus": {"cases": 3, "present": 3, "one_piece": 1.0,
                                     "volume_ml": {"min": 0.0, "p01": 0.0, "p50": 0.0, "p99": 0.0, "max": 0.0}}})
    assert check_segmentation(seg, task, old) == []  # neither checked against sizes it cannot compare with
