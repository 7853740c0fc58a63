"""benchmarks/bench_trust_headneck.py on a tiny synthetic setup: two tiny models, three partially labelled cases."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import blob_case, make_grid

from medseg.data.datasets import load_dataset
from medseg.errors import InputError
from medseg.io import write_image, write_label_map

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))  # the benchmarks are scripts, not a package
from bench_trust_headneck import markdown, measure, recompute_statistics


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
    entries = []
    for i, orientation in enumerate(["LPS", "RAS", "LPS"]):
        grid = make_grid(orientation, shape=(44, 40, 20), spacing=(1.5, 1.5, 3.0))
        image, labels = blob_case(grid, seed=20 + i)
        entry = {"image": f"./imagesTr/hn_{i}.nii.gz", "label": f"./labelsTr/hn_{i}.nii.gz"}
        if i == 1:
            labels[labels == 3] = 0
            entry["contoured"] = ["prostate", "bladder", "femoral_head_left", "femoral_head_right"]
        write_image(image, grid, root / "imagesTr" / f"hn_{i}.nii.gz")
        write_label_map(labels, grid, root / "labelsTr" / f"hn_{i}.nii.gz")
        entries.append(entry)
    (root / "dataset.json").write_text(json.dumps({"name": "hn", "labels": {"0": "background"}, "training": entries}))
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
