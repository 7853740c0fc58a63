"""benchmarks/bench_trust_headneck.py on a tiny synthetic setup: two tiny models, three partially labelled cases."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import partial_blob_dataset

from medseg.data.datasets import load_dataset
from medseg.errors import InputError

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))  # the benchmarks are scripts, not a package
from bench_trust_headneck import (
    calibrate_on_validation,
    ensemble_predictor,
    main,
    markdown,
    measure,
    recompute_statistics,
)


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory) -> list[Path]:
    """The tiny model, and a copy with its weights perturbed: two models 'trained elsewhere', one name each."""
    root = tmp_path_factory.mktemp("elsewhere")
    folders = [root / "a" / "model", root / "b" / "model"]
    for folder in folders:
        shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("cache", "tensorboard", "last.pt"))
    state = torch.load(folders[1] / "best.pt", weights_only=True)
    generator = torch.Generator().manual_seed(1)
    state["model"] = {k: v + 0.3 * torch.randn(v.shape, generator=generator) * v.std() if v.is_floating_point()
                      and v.numel() > 1 else v for k, v in state["model"].items()}
    torch.save(state, folders[1] / "best.pt")
    return folders


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Three unseen blob cases; the second did not contour the rectum (and has none drawn)."""
    root = tmp_path_factory.mktemp("held_out")
    partial_blob_dataset(root, ["LPS", "RAS", "LPS"], first_seed=20)
    return load_dataset(root)


def test_each_model_and_their_ensemble_scored_on_contoured_organs(models, held_out):
    result = measure(models, held_out, device="cpu", echo=lambda line: None)

    assert list(result["dice"]) == ["a/model", "b/model", "ensemble"]
    rows = result["organ_cases"]
    assert len(rows) == 3 * (5 + 4 + 5)  # three runs; the second case without its rectum
    assert not [r for r in rows if r["case"] == "hn_1" and r["organ"] == "rectum"]
    assert all(r["confidence"] is None or 0 < r["confidence"] <= 1 for r in rows)
    for name, quality in result["flags"].items():  # the summary is what the rows say
        mine = [r for r in rows if r["model"] == name and r["dice"] is not None]
        bad = [r for r in mine if r["dice"] < 0.5]
        assert quality["organ_cases"] == len(mine) and quality["dice_below_0.5"] == len(bad)
        if bad:
            assert quality["recall_dice_below_0.5"] == round(sum(bool(r["flags"]) for r in bad) / len(bad), 3)
        assert set(quality["spearman_per_organ"]) == {"prostate", "bladder", "rectum", "femoral_head_left",
                                                      "femoral_head_right"}
    gain = result["ensemble_minus_best_single"]
    best = max(result["dice"]["a/model"]["bladder"], result["dice"]["b/model"]["bladder"])
    assert gain["bladder"] == pytest.approx(result["dice"]["ensemble"]["bladder"] - best, abs=1e-4)
    assert result["judged"] == "ensemble" and set(result["met"]) == set(result["goals"])

    text = markdown({**result, "command": "python benchmarks/bench_trust_headneck.py --models a b"})
    assert "| organ | a/model | b/model | ensemble | ensemble - best single |" in text
    assert "| ensemble | 14 |" in text and "Goals (ensemble): recall_dice_below_0.5 " in text


def test_a_model_that_trained_on_a_held_out_case_is_refused(models, tiny_dataset):
    seen = [case for case in load_dataset(tiny_dataset[0]) if case.name == "blob_1"]
    with pytest.raises(InputError, match=r"a/model: trained on held-out case\(s\) blob_1; train on the first 170"):
        measure(models, seen, device="cpu", echo=lambda line: None)


def test_statistics_recomputed_for_a_model_folder_from_before_the_lateral_offsets(models, tiny_dataset, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(models[0], old)
    config = json.loads((old / "config.json").read_text())
    trained = config["fingerprint"]["organ_statistics"]["femoral_head_left"]["offset_rl_mm"]
    for entry in config["fingerprint"]["organ_statistics"].values():
        entry.pop("offset_rl_mm", None), entry.pop("offset_ap_mm", None)
    (old / "config.json").write_text(json.dumps(config))
    known = {}
    stats = recompute_statistics([old, models[1]], tiny_dataset[0], known)
    assert len(known) == 1  # one split: computed once
    lateral = stats.organs["femoral_head_left"]["offset_rl_mm"]
    assert lateral > 5 > -5 > stats.organs["femoral_head_right"]["offset_rl_mm"]  # LPS x: + is the patient's left
    assert lateral == pytest.approx(trained, abs=0.01)  # what training recorded, from the same cases


def test_calibrate_first_on_each_models_own_validation_cases(models, held_out, tiny_dataset):
    result = measure(models, held_out, device="cpu", echo=lambda line: None, calibrate_from=tiny_dataset[0])

    config = json.loads((models[0] / "config.json").read_text())
    unseen = sorted(set(config["split"]["validation"]) - set(config["split"]["train"]))
    assert set(result["calibration"]) == {"a/model", "b/model", "ensemble"}
    for name, calibration in result["calibration"].items():
        assert calibration["cases"] == unseen and calibration["seconds"] > 0  # copies: one split, so one for all
        assert not set(calibration["cases"]) & set(result["case_names"])
        for row in (r for r in result["organ_cases"] if r["model"] == name and r["confidence"] is not None):
            threshold = calibration["organs"][row["organ"]]["threshold"] or 0.8
            flagged = [f for f in row["flags"] if f.startswith("confidence:")]
            assert bool(flagged) == (row["confidence"] < threshold)
            assert all(f"flagged below {threshold}, " in f for f in flagged)
    text = markdown({**result, "command": "python benchmarks/bench_trust_headneck.py --models a b --calibrate"})
    assert "**Confidence thresholds** (chosen on validation cases" in text
    assert f"- ensemble: {len(unseen)} validation case(s) that none of its 2 model folder(s) trained on" in text


def test_calibration_on_a_held_out_case_is_refused(models, tiny_dataset):
    predictor, _ = ensemble_predictor([models[0]], "cpu", False)
    validation = json.loads((models[0] / "config.json").read_text())["split"]["validation"]
    with pytest.raises(InputError, match=rf"calibration on held-out case\(s\) {validation[0]} refused"):
        calibrate_on_validation(predictor, tiny_dataset[0], held_out={validation[0], "hn_200"})


def test_a_two_case_smoke_run_with_calibration(models, tiny_dataset, tmp_path, capsys):
    """The command line on a dataset laid out as openkbp-hn: 170 cases first (the models' own among them),
    then the held-out ones, here two (links to the tiny dataset's files)."""
    source = tiny_dataset[0]
    data = tmp_path / "hn"
    (data / "imagesTr").mkdir(parents=True), (data / "labelsTr").mkdir()
    entries = [{"image": f"./imagesTr/blob_{i}.nii.gz", "label": f"./labelsTr/blob_{i}.nii.gz"} for i in range(6)]
    for k in range(166):
        for sub in ("imagesTr", "labelsTr"):
            (data / sub / f"hn_{k:03d}.nii.gz").symlink_to(source / sub / f"blob_{k % 6}.nii.gz")
        entries.append({"image": f"./imagesTr/hn_{k:03d}.nii.gz", "label": f"./labelsTr/hn_{k:03d}.nii.gz"})
    for i in range(6):
        for sub in ("imagesTr", "labelsTr"):
            (data / sub / f"blob_{i}.nii.gz").symlink_to(source / sub / f"blob_{i}.nii.gz")
    (data / "dataset.json").write_text(json.dumps({"name": "hn", "labels": {"0": "background"}, "training": entries}))
    results = tmp_path / "results"
    assert main(["--models", *map(str, models), "--data", str(data), "--cases", "2", "--calibrate", "--device", "cpu",
                 "--results", str(results)]) == 0
    result = json.loads((results / "results.json").read_text())
    assert result["case_names"] == ["hn_164", "hn_165"] and "--calibrate" in result["command"]
    assert all(c["cases"] == sorted(c["cases"]) and "hn_16" not in " ".join(c["cases"])
               for c in result["calibration"].values())
    assert "**Confidence thresholds**" in (results / "results.md").read_text()
