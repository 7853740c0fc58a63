"""The DeepLab-style network: planned strides, output on the input grid, a real training step, a model folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import TINY_TASK

from medseg.config import Network, load_task
from medseg.model.deeplab import atrous_strides
from medseg.model.networks import build_network, main_output, plan_network
from medseg.runtime import autocast, prepare_network

DEEPLAB = "network: {name: deeplab, filters: [4, 8, 16, 32]}"


def deeplab_plan(patch, spacing, filters=(4, 8, 16, 32), channels=2, classes=3):
    return plan_network(Network(name="deeplab", filters=filters), channels, classes, patch, spacing)


def test_strides_stop_at_output_stride_8():
    strides = ((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    assert atrous_strides(strides) == ((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2), (1, 1, 2))
    plan = deeplab_plan((96, 96, 32), (1.5, 1.5, 3.0), filters=(16, 32, 64, 128, 192))
    assert plan.divisor == (8, 8, 8)  # the U-Net plan would need 16 x 16 x 8
    assert plan.deep_supervision is False


@pytest.mark.parametrize("patch, spacing", [
    pytest.param((32, 32, 32), (1.0, 1.0, 1.0), id="isotropic"),
    pytest.param((32, 24, 8), (0.8, 0.8, 4.0), id="anisotropic"),
    pytest.param((24, 40, 16), (1.5, 1.5, 3.0), id="thick-slices"),
])
def test_output_has_the_input_shape(patch, spacing):
    plan = deeplab_plan(patch, spacing)
    assert all(p % d == 0 for p, d in zip(patch, plan.divisor))
    network = build_network(plan).eval()
    with torch.no_grad():
        out = network(torch.randn(2, 2, *patch))
    assert out.shape == (2, 3, *patch)
    assert torch.isfinite(out).all()


def test_prepared_network_matches_and_runs_in_bf16_channels_last():
    """prepare_network's GroupNorm swap keeps the maths; bf16 autocast on channels-last input still works."""
    plan = deeplab_plan((32, 24, 8), (0.8, 0.8, 4.0))
    torch.manual_seed(0)
    network = build_network(plan).eval()
    x = torch.randn(1, 2, 32, 24, 8)
    with torch.no_grad():
        reference = network(x)
        prepared = prepare_network(network, torch.device("cpu"), "fp32")
        assert torch.allclose(prepared(x), reference, atol=1e-4)
        prepared.to(memory_format=torch.channels_last_3d)
        with autocast(torch.device("cpu"), "bf16"):
            low = prepared(x.contiguous(memory_format=torch.channels_last_3d)).float()
    assert low.shape == reference.shape
    assert (low - reference).abs().mean() < 0.1 * reference.abs().mean() + 1e-3


def test_a_real_training_step_lowers_the_loss(tmp_path):
    from medseg.train.steps import make_loss, make_optimizer, train_step

    task_file = tmp_path / "tiny.yaml"
    task_file.write_text(TINY_TASK.replace("network: {name: dynunet, filters: [4, 8, 16], deep_supervision: true}",
                                           DEEPLAB))
    task = load_task(task_file)
    plan = plan_network(task.network, 1, task.num_classes, (16, 16, 16), (3.0, 3.0, 3.0))
    torch.manual_seed(0)
    network = build_network(plan)
    grid = np.stack(np.meshgrid(*[np.arange(16)] * 3, indexing="ij"))
    label = (((grid - 8) ** 2).sum(0) <= 25).astype(np.int64)  # a ball of organ 2 in a cube of background
    label[label == 1] = 2
    image = torch.from_numpy(label > 0).float()[None, None] + 0.1 * torch.randn(1, 1, 16, 16, 16)
    batch = {"image": image.repeat(2, 1, 1, 1, 1), "label": torch.from_numpy(label)[None, None].repeat(2, 1, 1, 1, 1)}
    loss_fn, optimizer = make_loss(task, plan), make_optimizer(task, network)
    losses = [train_step(network, batch, loss_fn, optimizer, task, torch.device("cpu"), "fp32") for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0]
    assert main_output(network(image)).shape == (1, task.num_classes, 16, 16, 16)


def test_model_folder_saves_loads_and_predicts(tiny_dataset, tmp_path, write_case):
    from medseg.infer.predictor import Predictor
    from medseg.train import TrainOptions, fit

    root, task = tiny_dataset
    task_file = tmp_path / "tiny_deeplab.yaml"
    task_file.write_text(task.read_text().replace(
        "network: {name: dynunet, filters: [4, 8, 16], deep_supervision: true}", DEEPLAB))
    folder = fit(TrainOptions(task=task_file, data=root, out=tmp_path / "run", epochs=1))
    config = json.loads((folder / "config.json").read_text())
    assert config["network"]["name"] == "deeplab" and config["network"]["deep_supervision"] is False
    state = torch.load(folder / "best.pt", weights_only=True)
    assert any(k.startswith("aspp.") for k in state["model"]) and any(k.startswith("head.") for k in state["model"])
    image_path, _, grid = write_case(orientation="PLI")
    segmentation = Predictor(folder, device="cpu").predict(image_path)
    assert segmentation.labels.shape == grid.shape and segmentation.labels.dtype == np.uint8
    assert set(np.unique(segmentation.labels)) <= set(range(6))
    source = sitk.ReadImage(str(image_path))
    assert np.allclose(segmentation.grid.spacing, source.GetSpacing())
    assert np.allclose(segmentation.grid.direction, source.GetDirection())
