"""Fold ensembles: the folds' probabilities averaged on the scan's grid; the cv folder's post-processing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import blob_case, make_grid

from medseg.cli import main
from medseg.errors import InputError
from medseg.infer.ensemble import (
    TASK_FILE_SOURCE,
    EnsemblePredictor,
    fold_folders,
    is_cv_folder,
    make_predictor,
    postprocessing_of,
    read_postprocessing,
)
from medseg.infer.predictor import Predictor
from medseg.io import write_image


@pytest.fixture(scope="module")
def cv(tiny_model, tmp_path_factory) -> Path:
    """A cross-validation folder of two folds: the tiny model, and the tiny model with other weights."""
    folder = tmp_path_factory.mktemp("ensemble") / "cv"
    shutil.copytree(tiny_model, folder / "fold_0", ignore=shutil.ignore_patterns("cache", "tensorboard"))
    shutil.copytree(tiny_model, folder / "fold_1", ignore=shutil.ignore_patterns("cache", "tensorboard"))
    state = torch.load(folder / "fold_1" / "best.pt", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    state["model"] = {k: v + 0.3 * torch.randn(v.shape, generator=generator) * v.std() if v.is_floating_point()
                      and v.numel() > 1 else v for k, v in state["model"].items()}
    torch.save(state, folder / "fold_1" / "best.pt")
    (folder / "fold_1" / "last.pt").unlink(missing_ok=True)
    return folder


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    grid = make_grid("oblique", shape=(44, 40, 18), spacing=(1.5, 1.4, 3.0))
    image, _ = blob_case(grid, seed=4)
    return write_image(image, grid, tmp_path_factory.mktemp("scan") / "scan.nii.gz")


def test_a_cv_folder_is_recognised_by_its_folds(cv, tiny_model):
    assert is_cv_folder(cv) and fold_folders(cv) == [cv / "fold_0", cv / "fold_1"]
    assert not is_cv_folder(tiny_model) and fold_folders(tiny_model) == []
    assert isinstance(make_predictor(tiny_model, device="cpu"), Predictor)
    assert isinstance(make_predictor(cv, device="cpu"), EnsemblePredictor)


def test_one_member_gives_the_single_models_mask(tiny_model, scan):
    single = Predictor(tiny_model, device="cpu").predict(scan)
    ensemble = EnsemblePredictor([tiny_model], device="cpu").predict(scan)
    np.testing.assert_array_equal(ensemble.labels, single.labels)
    assert ensemble.grid == single.grid
    assert ensemble.uncertainty is None  # maps only on request


def test_with_flips_one_member_gives_the_single_models_probabilities(tiny_model, scan):
    """Both average the flips' softmax (not the flips' logits): the one-model ensemble is the model."""
    single = Predictor(tiny_model, device="cpu", tta=True).predict(scan, keep_probabilities=True)
    ensemble = EnsemblePredictor([tiny_model], device="cpu", tta=True, uncertainty=True).predict(
        scan, keep_probabilities=True)
    np.testing.assert_array_equal(ensemble.labels, single.labels)
    np.testing.assert_array_equal(ensemble.probabilities, single.probabilities)
    assert ensemble.disagreement is not None  # four flips: four members


def test_the_ensemble_averages_the_folds_probabilities(cv, scan):
    folds = [Predictor(f, device="cpu").predict(scan, keep_probabilities=True) for f in fold_folders(cv)]
    ensemble = EnsemblePredictor(fold_folders(cv), device="cpu").predict(scan, keep_probabilities=True)
    assert not np.array_equal(folds[0].probabilities, folds[1].probabilities)  # the folds differ
    mean = (folds[0].probabilities.astype(float) + folds[1].probabilities) / 2
    assert np.abs(ensemble.probabilities - mean).max() <= 1.0  # uint8 percent: rounding only
    assert set(ensemble.confidence) == {"prostate", "bladder", "rectum", "femoral_head_left", "femoral_head_right"}


def test_predict_with_a_cv_folder_uses_its_postprocessing_choice(cv, scan, tmp_path, capsys):
    assert read_postprocessing(cv) is None
    assert postprocessing_of(make_predictor(cv, device="cpu")) == {"largest_component": ["bladder"],
                                                                    "source": TASK_FILE_SOURCE}
    (cv / "postprocessing.json").write_text(json.dumps({"largest_component": ["prostate", "rectum"]}))
    try:
        out = tmp_path / "out"
        assert main(["predict", str(scan), "-m", str(cv), "-o", str(out), "--no-overlays", "--device", "cpu"]) == 0
    finally:
        (cv / "postprocessing.json").unlink()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["postprocessing"]["largest_component"] == ["prostate", "rectum"]
    assert "postprocessing.json" in summary["postprocessing"]["source"]
    mask = sitk.ReadImage(str(out / "scan_seg.nii.gz"))
    source = sitk.ReadImage(str(scan))
    assert mask.GetSize() == source.GetSize()
    np.testing.assert_allclose(mask.GetDirection(), source.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(mask.GetOrigin(), source.GetOrigin(), atol=1e-4)
    volumes = json.loads((out / "scan_volumes.json").read_text())
    assert "confidence" in volumes["organs"]["bladder"]  # an ensemble always scores its organs


def test_malformed_postprocessing_and_mismatched_folds_are_input_errors(cv, tmp_path):
    bad = tmp_path / "cv"
    shutil.copytree(cv, bad)
    (bad / "postprocessing.json").write_text(json.dumps({"largest_component": "bladder"}))
    with pytest.raises(InputError, match=r"postprocessing.json: 'largest_component' must be a list of organ names"):
        make_predictor(bad, device="cpu")
    (bad / "postprocessing.json").unlink()
    config = json.loads((bad / "fold_1" / "config.json").read_text())
    config["preprocessing"]["spacing"] = [2.0, 3.0, 3.0]
    (bad / "fold_1" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"fold_1: its model spacing 2x3x3 mm differs from .*fold_0's 3x3x3 mm"):
        make_predictor(bad, device="cpu")
    config["task"]["labels"] = {**config["task"]["labels"], "6": {"name": "urethra"}}
    (bad / "fold_1" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"fold_1: its organs or channels differ from .*fold_0's"):
        make_predictor(bad, device="cpu")


def test_models_with_other_patch_sizes_make_one_ensemble(cv, scan, tmp_path):
    """Models of one task trained elsewhere, with another window: each runs its own windows."""
    other = tmp_path / "other"
    shutil.copytree(cv / "fold_1", other)
    config = json.loads((other / "config.json").read_text())
    config["network"]["patch_size"] = config["task"]["patch_size"] = [32, 32, 16]
    (other / "config.json").write_text(json.dumps(config))
    ensemble = EnsemblePredictor([cv / "fold_0", other], device="cpu").predict(scan, keep_probabilities=True)
    single = Predictor(cv / "fold_0", device="cpu").predict(scan, keep_probabilities=True)
    assert ensemble.labels.shape == single.labels.shape and ensemble.grid == single.grid
    assert not np.array_equal(ensemble.probabilities, single.probabilities)  # the second model counted
