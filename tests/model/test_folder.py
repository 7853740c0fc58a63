"""medseg.model.folder: the typed run configuration, and model folders written by earlier medseg versions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import blob_case, make_grid

from medseg import Predictor
from medseg.errors import ConfigError, InputError
from medseg.model.folder import CONFIG_NAME, RunConfig, read_run_config

LEGACY_RUN = Path(__file__).resolve().parents[1] / "fixtures" / "run_v0_1"


def test_run_config_round_trips_through_json(tiny_model):
    config = read_run_config(tiny_model)
    again = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert config.network.patch_size == config.task.patch_size
    assert set(config.split) == {"train", "validation"}


def test_a_folder_written_before_the_stage_packages_predicts_as_it_did(tmp_path):
    """tests/fixtures/run_v0_1: a tiny run (config.json, best.pt) trained by medseg as it was before the
    stage subpackages, with the labels and probabilities it gave then for a seeded blob case."""
    grid = make_grid("LPS", shape=(48, 40, 20), spacing=(1.5, 1.5, 3.0))
    image, _ = blob_case(grid, seed=11)
    model = shutil.copytree(LEGACY_RUN, tmp_path / "run")  # a backend may cache a converted network there
    seg = Predictor(model, device="cpu", precision="fp32").predict((image, grid), keep_probabilities=True)
    expected = np.load(LEGACY_RUN / "expected.npz")
    assert seg.grid == grid
    assert np.array_equal(seg.labels, expected["labels"])
    assert np.abs(seg.probabilities.astype(int) - expected["probabilities"]).max() <= 1
    assert seg.labels.any()  # the reference is not a trivially empty mask


def test_missing_keys_are_named(tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(LEGACY_RUN, folder)
    raw = json.loads((folder / CONFIG_NAME).read_text())
    del raw["network"]
    (folder / CONFIG_NAME).write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"config.json: missing key\(s\) network"):
        read_run_config(folder)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(InputError, match="not a medseg model folder"):
        read_run_config(tmp_path)
