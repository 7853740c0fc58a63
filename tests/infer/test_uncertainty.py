"""Uncertainty: entropy and disagreement by hand, organ confidence, maps on the scan's grid, and
`medseg predict --uncertainty` end to end."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import blob_case, make_grid

from medseg.cli import main
from medseg.data.preprocess import model_grid
from medseg.infer.uncertainty import Accumulator, entropy, organ_confidence, to_scan_grid
from medseg.io import write_image


def probabilities(*columns) -> torch.Tensor:
    """(K, N, 1, 1) from per-voxel class probabilities."""
    return torch.tensor(columns, dtype=torch.float32).T.reshape(len(columns[0]), len(columns), 1, 1)


def test_entropy_is_zero_for_one_class_and_log_k_for_all_equal():
    p = probabilities([1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(entropy(p).flatten(), [0.0, math.log(4), math.log(2)], atol=1e-6)


def test_members_that_agree_have_no_disagreement_and_opposite_ones_the_most():
    same = Accumulator(with_entropy=True)
    for _ in range(3):
        same.add(probabilities([0.7, 0.3], [0.5, 0.5]))
    uncertainty, disagreement = same.maps(same.mean_())
    np.testing.assert_allclose(disagreement.flatten(), [0.0, 0.0], atol=1e-6)
    h = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))
    np.testing.assert_allclose(uncertainty.flatten(), [h / math.log(2), 1.0], atol=1e-6)

    opposite = Accumulator(with_entropy=True)
    opposite.add(probabilities([1.0, 0.0]))
    opposite.add(probabilities([0.0, 1.0]))
    mean = opposite.mean_()
    np.testing.assert_allclose(mean.flatten(), [0.5, 0.5])
    uncertainty, disagreement = opposite.maps(mean)
    assert float(uncertainty) == pytest.approx(1.0) and float(disagreement) == pytest.approx(1.0)  # all epistemic

    single = Accumulator(with_entropy=True)
    single.add(probabilities([0.5, 0.5]))
    assert single.maps(single.mean_())[1] is None  # one member: no disagreement to speak of


def test_organ_confidence_is_the_mean_probability_where_the_organ_wins():
    # voxels: organ 1 wins with 0.9 and 0.7; organ 2 with 0.6; background elsewhere; organ 3 nowhere
    mean = probabilities([0.05, 0.9, 0.05, 0.0], [0.2, 0.7, 0.1, 0.0], [0.3, 0.1, 0.6, 0.0], [0.8, 0.1, 0.1, 0.0])
    scores = organ_confidence(mean, {1: "a", 2: "b", 3: "c"})
    assert scores["a"]["mean_probability"] == pytest.approx(0.8)
    assert scores["b"]["mean_probability"] == pytest.approx(0.6)
    assert scores["c"] == {"mean_probability": None, "one_minus_entropy": None, "expected_dice": None}
    h = entropy(mean).flatten() / math.log(4)
    assert scores["a"]["one_minus_entropy"] == pytest.approx(1 - float(h[:2].mean()), abs=1e-4)
    # a: mask of 2 voxels holding 0.9 + 0.7 of its 1.8 expected voxels -> 2 * 1.6 / (1.8 + 2)
    assert scores["a"]["expected_dice"] == pytest.approx(2 * 1.6 / 3.8, abs=1e-4)
    assert scores["b"]["expected_dice"] == pytest.approx(2 * 0.6 / (0.85 + 1), abs=1e-4)


def test_expected_dice_falls_with_probability_left_outside_the_mask():
    # the same sure voxel; in the second case another voxel holds 0.45 of the organ and loses to background
    alone = organ_confidence(probabilities([0.0, 1.0], [1.0, 0.0]), {1: "a"})["a"]
    missed = organ_confidence(probabilities([0.0, 1.0], [0.55, 0.45]), {1: "a"})["a"]
    assert alone["mean_probability"] == missed["mean_probability"] == pytest.approx(1.0)  # blind to what it missed
    assert alone["expected_dice"] == pytest.approx(1.0)
    assert missed["expected_dice"] == pytest.approx(2 * 1.0 / (1.45 + 1), abs=1e-4)


def test_an_ensembles_confidence_is_its_members_mean_on_their_own_scale():
    # member 1: organ a wins voxel 0 with 0.9 and voxel 1 with 0.6; member 2: a voxel 0 with 0.7, b voxel 2
    first = probabilities([0.1, 0.9, 0.0], [0.4, 0.6, 0.0], [0.9, 0.1, 0.0])
    second = probabilities([0.3, 0.7, 0.0], [0.6, 0.4, 0.0], [0.3, 0.0, 0.7])
    organs = {1: "a", 2: "b"}
    ensemble = Accumulator(with_entropy=False, organs=organs)
    ensemble.add(first.clone()), ensemble.add(second.clone())
    mean = ensemble.mean_()
    scores = ensemble.confidence(mean)
    assert organ_confidence(mean, organs)["a"]["mean_probability"] == pytest.approx(0.8)  # p̄, where a wins in it
    assert scores["a"]["mean_probability"] == pytest.approx((0.75 + 0.7) / 2)  # each member where it predicts a
    assert scores["b"]["mean_probability"] is None  # b wins nowhere in the mean: no confidence, whatever member 2 says
    assert organ_confidence(second, organs)["b"]["mean_probability"] is not None

    one = Accumulator(with_entropy=False, organs=organs)
    one.add(first.clone())
    assert one.confidence(one.mean_()) == organ_confidence(first, organs)  # a single model: unchanged

    absent = Accumulator(with_entropy=False, organs=organs)
    absent.add(first.clone()), absent.add(probabilities([0.6, 0.4, 0.0], [0.9, 0.1, 0.0], [0.9, 0.0, 0.1]))
    mean = absent.mean_()  # a still wins voxel 0 (p̄ 0.65); member 2 predicts it nowhere: counts as 0
    assert absent.confidence(mean)["a"]["mean_probability"] == pytest.approx(0.75 / 2)


def test_a_map_goes_to_the_scans_exact_grid():
    grid = make_grid("oblique", shape=(30, 26, 12), spacing=(1.2, 1.1, 2.5))
    model = model_grid((2.0, 2.0, 3.0), grid)
    box = tuple(slice(0, n) for n in model.shape)
    values = to_scan_grid(torch.full(model.shape, 0.25), box, model, grid)
    assert values.shape == grid.shape and values.dtype == np.float32
    inner = values[5:-5, 5:-5, 3:-3]
    np.testing.assert_allclose(inner, 0.25, atol=1e-6)  # a constant stays constant inside the model grid


def test_predict_with_uncertainty_writes_maps_confidence_and_a_page_layer(tiny_model, tmp_path, capsys):
    grid = make_grid("PLI", shape=(40, 36, 16), spacing=(1.5, 1.5, 3.0))
    image, _ = blob_case(grid, seed=6)
    scan = write_image(image, grid, tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    assert main(["predict", str(scan), "-m", str(tiny_model), "-o", str(out), "--uncertainty", "--tta",
                 "--device", "cpu"]) == 0
    source = sitk.ReadImage(str(scan))
    for name in ("uncertainty", "disagreement"):  # --tta: four flipped members, so their disagreement too
        written = sitk.ReadImage(str(out / f"scan_{name}.nii.gz"))
        assert written.GetPixelID() == sitk.sitkFloat32 and written.GetSize() == source.GetSize()
        np.testing.assert_allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(written.GetDirection(), source.GetDirection(), atol=1e-6)
        values = sitk.GetArrayFromImage(written)
        assert values.min() >= 0.0 and values.max() <= 1.0 + 1e-6 and values.max() > 0.0
    volumes = json.loads((out / "scan_volumes.json").read_text())
    scored = [v["confidence"] for v in volumes["organs"].values() if v["confidence"] is not None]
    assert scored and all(0.0 <= c <= 1.0 for c in scored)
    page = (out / "review.html").read_text()
    assert 'id="show-uncertainty"' in page
    assert re.search(r'<img class="uncertainty" src="scan_uncertainty.png"', page)
    assert (out / "scan_uncertainty.png").is_file()
    assert "confidence" in capsys.readouterr().err


def test_a_task_that_flips_by_default_is_overridden_by_no_tta(tiny_model, tmp_path):
    """`inference.tta: true` in the task makes flips the default; `--no-tta` leaves them out, `--tta` is the same
    as the default. Seen through the flipped members' disagreement map, written only where there are flips."""
    model = Path(shutil.copytree(tiny_model, tmp_path / "model", ignore=shutil.ignore_patterns("cache", "openvino")))
    config = json.loads((model / "config.json").read_text())
    assert config["task"]["inference"]["tta"] is False
    config["task"]["inference"]["tta"] = True
    (model / "config.json").write_text(json.dumps(config))
    grid = make_grid("LPS", shape=(40, 36, 16), spacing=(1.5, 1.5, 3.0))
    scan = write_image(blob_case(grid, seed=7)[0], grid, tmp_path / "scan.nii.gz")
    written = {}
    for flag in ([], ["--no-tta"], ["--tta"]):
        out = tmp_path / ("out" + "".join(flag))
        assert main(["predict", str(scan), "-m", str(model), "-o", str(out), "--uncertainty", "--no-overlays",
                     "--device", "cpu", *flag]) == 0
        written[tuple(flag)] = (out / "scan_disagreement.nii.gz").is_file()
        assert (out / "scan_uncertainty.nii.gz").is_file()
        assert json.loads((out / "summary.json").read_text())["test_time_flips"] is written[tuple(flag)]
    assert written == {(): True, ("--no-tta",): False, ("--tta",): True}
