"""medseg.train.validation: predict's windows (the body's box on a CT) score as the full grid did, on
the tiny trained model; OpenVINO validates the weights the network holds now, and only where it pays."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torchio as tio
from conftest import Oracle

from medseg.data.datasets import load_dataset
from medseg.data.patches import load_subject
from medseg.data.preprocess import ChannelIntensity
from medseg.geometry import body_box
from medseg.infer.backends import openvino_version
from medseg.model.folder import load_checkpoint, read_run_config
from medseg.model.networks import build_network
from medseg.runtime import prepare_network
from medseg.train.steps import WeightAverage
from medseg.train.validation import (
    body_threshold,
    measure_validation,
    openvino_pays,
    validate,
    validation_box,
    validation_windows,
)

needs_openvino = pytest.mark.skipif(openvino_version() is None, reason='needs pip install "medseg[openvino]"')
AIR = 12  # voxels of air added around the tiny cases on each side in-plane


@pytest.fixture(scope="module")
def tiny(tiny_model, tiny_dataset, tmp_path_factory):
    """The tiny run's task, plan, a CT preprocessing whose window holds -500 HU (the tiny task's own
    [-200, 800] hides it), two of its cases preprocessed that way, each also with air around it, and
    the trained network laid out as training lays it out."""
    config = read_run_config(tiny_model)
    stats = config.preprocessing.channels[0]
    prep = replace(config.preprocessing, channels=(ChannelIntensity((-1000.0, 800.0), stats.mean, stats.std),))
    cache = tmp_path_factory.mktemp("cache")
    cases = load_dataset(tiny_dataset[0])[:2]
    plain = [load_subject(case, prep, config.task, cache) for case in cases]
    air = (-1000.0 - stats.mean) / stats.std
    padded = [with_air(subject, air) for subject in plain]
    network = build_network(config.network)
    network.load_state_dict(load_checkpoint(tiny_model / "best.pt")["model"])
    network = prepare_network(network, torch.device("cpu"), "fp32", training=True)
    return config.task, config.network, prep, plain, padded, network


def with_air(subject: tio.Subject, air: float) -> tio.Subject:
    pads = (0, 0, AIR, AIR, AIR, AIR)  # z untouched, y and x grown on both sides
    image = torch.nn.functional.pad(subject["image"].data, pads, value=air)
    label = torch.nn.functional.pad(subject["label"].data, pads, value=0)
    return tio.Subject(image=tio.ScalarImage(tensor=image), label=tio.LabelMap(tensor=label))


def scores(network, subjects, tiny, **options) -> dict[str, float]:
    task, plan = tiny[:2]
    return validate(network, subjects, task, plan, torch.device("cpu"), precision="fp32", **options)


def test_body_threshold_is_minus_500_hu_in_the_volume_units(tiny_model):
    prep = read_run_config(tiny_model).preprocessing
    stats = prep.channels[0]
    assert body_threshold(prep) is None  # the tiny task's window [-200, 800]: air and fat look alike
    wide = replace(prep, channels=(ChannelIntensity((-1000.0, 800.0), stats.mean, stats.std),))
    assert body_threshold(wide) == pytest.approx((-500.0 - stats.mean) / stats.std)
    assert body_threshold(replace(wide, normalize="image")) is None  # per-image z-score: no fixed value


def test_the_box_is_predicts_body_box_on_the_scan_units(tiny):
    task, plan, prep, _, padded, _ = tiny
    stats = prep.channels[0]
    image = padded[0]["image"].data
    box = validation_box(image, task, plan, prep)
    hu = image[0] * stats.std + stats.mean  # what predict thresholds, before normalising
    assert box == body_box(hu, plan.patch_size)
    assert [b.stop - b.start for b in box] < list(image.shape[1:])  # the air is left out
    assert validation_box(image, task, plan, None) == tuple(slice(0, n) for n in image.shape[1:])
    mr = replace(task, modality="MR")
    assert validation_box(image, mr, plan, prep) == tuple(slice(0, n) for n in image.shape[1:])


def test_where_the_body_fills_the_grid_the_scores_are_the_old_ones(tiny):
    """The trained network on the tiny cases: the box is the whole grid, so are the windows and the scores."""
    task, plan, prep, plain, _, network = tiny
    for subject in plain:
        image = subject["image"].data
        assert validation_box(image, task, plan, prep) == tuple(slice(0, n) for n in image.shape[1:])
    old, new = scores(network, plain, tiny), scores(network, plain, tiny, prep=prep)
    assert any(v > 0 for v in old.values())  # trained: it finds organs
    assert new == old


def test_with_air_around_the_body_the_crop_keeps_the_scores(tiny):
    """Windows over the body only (fewer, placed elsewhere), the air background: the same Dice on the
    whole grid, exactly, for a network whose answer does not depend on where a window sits (it reads
    each voxel's id; shifted by a voxel from the reference so that the scores are not all 1)."""
    task, plan, prep, plain, _, _ = tiny
    air = body_threshold(prep) - 1.0
    subjects = []
    for subject in plain:
        label = subject["label"].data
        ids = torch.roll(label, 1, dims=1).float()
        subjects.append(with_air(tio.Subject(image=tio.ScalarImage(tensor=ids), label=tio.LabelMap(tensor=label)), air))
    assert validation_windows(subjects, task, plan, prep) < validation_windows(subjects, task, plan, None)
    old, new = scores(Oracle(), subjects, tiny), scores(Oracle(), subjects, tiny, prep=prep)
    assert all(0.3 < v < 1.0 for v in old.values())
    assert new == old


@needs_openvino
def test_openvino_validates_the_weights_the_network_holds_now(tiny):
    """Converted inside the validation: after the weights change (and inside the EMA's block) it
    scores those weights, as torch does; the network keeps its training layout and its own weights."""
    prep, padded, network = tiny[2], tiny[4], tiny[5]
    before = scores(network, padded, tiny, prep=prep)
    assert scores(network, padded, tiny, prep=prep, backend="openvino") == pytest.approx(before, abs=1e-3, nan_ok=True)
    average = WeightAverage(network, decay=0.9)
    own = {k: v.clone() for k, v in network.state_dict().items()}
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.mul_(-1.0)
    changed = scores(network, padded, tiny, prep=prep)
    assert changed != pytest.approx(before, abs=1e-3, nan_ok=True)
    assert scores(network, padded, tiny, prep=prep, backend="openvino") == pytest.approx(changed, abs=1e-3, nan_ok=True)
    with average.applied(network):  # the averaged weights are the start's: the first scores again
        assert scores(network, padded, tiny, prep=prep, backend="openvino") == pytest.approx(before, abs=1e-3,
                                                                                            nan_ok=True)
    network.load_state_dict(own)
    assert any(type(m) is torch.nn.GroupNorm for m in network.modules())  # still laid out for training


@pytest.mark.parametrize("torch_s, openvino_s, convert_s, repeats, expected", [
    # head-and-neck, one thread: a 24-window case 1.90 s torch / 1.45 s OpenVINO, 4.7 s to convert
    pytest.param(1.90, 1.45, 4.7, 7.08, False, id="twelve-cropped-cases-torch"),
    pytest.param(1.90, 1.45, 4.7, 24.0, True, id="forty-one-cases-openvino"),
    pytest.param(0.23, 0.25, 0.0, 100.0, False, id="openvino-slower-never"),
    pytest.param(1.90, 1.45, 4.7, 10.0, False, id="just-short-of-break-even"),
])
def test_openvino_pays_only_where_the_saving_beats_the_conversion(torch_s, openvino_s, convert_s, repeats, expected):
    assert openvino_pays(torch_s, openvino_s, convert_s, repeats) is expected


def test_measure_validation_times_a_case_and_scales_it_by_windows(tiny):
    task, plan, prep, _, padded, network = tiny
    cost = measure_validation(network, padded, task, plan, torch.device("cpu"), precision="fp32", prep=prep)
    windows = validation_windows(padded, task, plan, prep)
    assert cost.repeats == pytest.approx(windows / validation_windows(padded[:1], task, plan, prep))
    assert set(cost.case_seconds) == ({"torch", "openvino"} if openvino_version() else {"torch"})
    pays = "openvino" in cost.case_seconds and openvino_pays(cost.case_seconds["torch"], cost.case_seconds["openvino"],
                                                             cost.convert_seconds, cost.repeats)
    assert cost.backend == ("openvino" if pays else "torch")
    convert = cost.convert_seconds if cost.backend == "openvino" else 0.0
    assert cost.seconds == pytest.approx(cost.repeats * cost.case_seconds[cost.backend] + convert)
    torch_only = measure_validation(network, padded, task, plan, torch.device("cpu"), precision="fp32", prep=prep,
                                    backend="torch")
    assert torch_only.backend == "torch" and set(torch_only.case_seconds) == {"torch"}
    assert torch_only.to_dict()["convert_seconds"] == 0.0


def test_no_cases_cost_nothing(tiny):
    task, plan, prep, _, _, network = tiny
    cost = measure_validation(network, [], task, plan, torch.device("cpu"), precision="fp32", prep=prep)
    assert cost.backend == "torch" and cost.seconds == 0.0
    assert all(np.isnan(v) for v in scores(network, [], tiny, prep=prep, backend="openvino").values())
