"""Transfer learning: a model for other labels starts from a trained one; the encoder frozen, then not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_TASK

from medseg.cli import main
from medseg.config import Network, load_task
from medseg.errors import InputError
from medseg.model.networks import build_network, plan_network
from medseg.train.transfer import encoder_names, load_matching, read_weights, start_weights

OUTPUT = "output_block.conv.conv.weight"  # DynUNet's 1x1 classifier: (classes, filters[0], 1, 1, 1)


def task_with_seven_classes(tmp_path: Path, network: str | None = None) -> Path:
    """The tiny task with a sixth organ (never drawn in the tiny dataset): one more output channel."""
    text = TINY_TASK.replace("5: femoral_head_right}", "5: femoral_head_right, 6: seminal_vesicles}")
    text = text.replace("steps_per_epoch: 5", "steps_per_epoch: 2")
    if network:
        text = text.replace("network: {name: dynunet, filters: [4, 8, 16], deep_supervision: true}", network)
    path = tmp_path / "tiny7.yaml"
    path.write_text(text)
    return path


def fresh_network(task_file: Path) -> torch.nn.Module:
    task = load_task(task_file)
    return build_network(plan_network(task.network, 1, task.num_classes, task.patch_size, (3.0, 3.0, 3.0)))


def test_matching_tensors_load_and_the_output_layer_stays_fresh(tiny_model, tmp_path):
    source = torch.load(tiny_model / "best.pt", weights_only=True)["model"]
    torch.manual_seed(1)
    network = fresh_network(task_with_seven_classes(tmp_path))
    before = {k: v.clone() for k, v in network.state_dict().items()}
    report = load_matching(network, read_weights(tiny_model)[0])
    after = network.state_dict()
    assert report["shape_mismatch"][OUTPUT] == {"source": [6, 4, 1, 1, 1], "network": [7, 4, 1, 1, 1]}
    assert set(report["loaded"]) | set(report["shape_mismatch"]) == set(after) and not report["missing"]
    assert all(torch.equal(after[k], source[k]) for k in report["loaded"])
    assert all(torch.equal(after[k], before[k]) for k in report["shape_mismatch"])
    assert len(report["loaded"]) > 20


def test_fine_tuning_freezes_the_encoder_then_trains_it(tiny_model, tiny_dataset, tmp_path):
    from medseg.train import TrainOptions, fit

    root, _ = tiny_dataset
    task_file = task_with_seven_classes(tmp_path)
    source = torch.load(tiny_model / "best.pt", weights_only=True)["model"]
    options = TrainOptions(task=task_file, data=root, out=tmp_path / "b", epochs=1, init_weights=tiny_model,
                           freeze_encoder_epochs=1)
    folder = fit(options)
    report = json.loads((folder / "init_weights.json").read_text())
    assert OUTPUT in report["shape_mismatch"] and report["freeze_encoder_epochs"] == 1
    encoder = report["encoder"]
    assert encoder and all(n.startswith(("input_block.", "downsamples.", "bottleneck.")) for n in encoder)
    first = torch.load(folder / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(first[k], source[k]) for k in encoder)  # frozen through epoch 1's steps
    decoder = [k for k in report["loaded"] if k.startswith("upsamples.") and k.endswith("conv.weight")]
    assert any(not torch.equal(first[k], source[k]) for k in decoder)  # while the rest trained

    text = (folder / "init_weights.json").read_text()
    fit(TrainOptions(task=task_file, data=root, out=folder, epochs=2, resume=True, init_weights=tiny_model))
    second = torch.load(folder / "last.pt", weights_only=True)["model"]
    assert any(not torch.equal(second[k], source[k]) for k in encoder)  # unfrozen in epoch 2
    assert (folder / "init_weights.json").read_text() == text
    log = (folder / "train.log").read_text()
    assert "--init-weights not re-applied" in log and "encoder unfrozen from epoch 2" in log


@pytest.mark.parametrize("family, inside, outside", [
    ("dynunet", "input_block.", "output_block."),
    ("deeplab", "encoder.0.", "head."),
    ("unet", "model.1.submodule.1.submodule.", "model.2."),
    ("segresnet", "down_layers.", "conv_final."),
])
def test_encoder_of_each_family(family, inside, outside):
    filters = (4, 8, 16) if family != "segresnet" else (8, 16, 32)
    network = build_network(plan_network(Network(name=family, filters=filters), 1, 3, (16, 16, 16), (1.0,) * 3))
    names = encoder_names(network, family)
    assert any(n.startswith(inside) for n in names)
    assert not any(n.startswith(outside) for n in names)
    assert len(names) < len(list(network.parameters()))


def test_no_matching_tensor_is_an_error(tiny_model, tmp_path):
    network = fresh_network(task_with_seven_classes(tmp_path, "network: {name: deeplab, filters: [4, 8, 16]}"))
    with pytest.raises(InputError, match="no tensor matches the deeplab network"):
        start_weights(network, tmp_path, "deeplab", tiny_model, 0, False, _Log())


def test_checkpoint_files_of_other_kinds(tiny_model, tmp_path):
    state = torch.load(tiny_model / "best.pt", weights_only=True)["model"]
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pt")
    weights, path = read_weights(tmp_path / "ddp.pt")
    assert path == tmp_path / "ddp.pt" and set(weights) == set(state)
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(InputError, match="notes.pt: not a PyTorch checkpoint"):
        read_weights(tmp_path / "notes.pt")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(InputError, match="empty_run: no best.pt or last.pt"):
        read_weights(tmp_path / "empty_run")


@pytest.mark.parametrize("arguments, message", [
    (["--freeze-encoder-epochs", "2"], "--freeze-encoder-epochs needs --init-weights"),
    (["--init-weights", "no/such/run"], "no/such/run: --init-weights not found"),
])
def test_cli_refuses_before_any_work(arguments, message, tiny_dataset, tmp_path, capsys):
    root, task = tiny_dataset
    code = main(["train", "--task", str(task), "--data", str(root), "--out", str(tmp_path / "run"), *arguments])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


class _Log:
    def info(self, message: str) -> None:
        pass


def test_a_run_killed_before_its_first_checkpoint_starts_again_from_its_source(tiny_model, tmp_path):
    """--resume without last.pt: the weights init_weights.json names are loaded again, with its freeze."""
    network = fresh_network(task_with_seven_classes(tmp_path))
    assert start_weights(network, tmp_path, "dynunet", tiny_model, 2, False, _Log()) == 2
    report = json.loads((tmp_path / "init_weights.json").read_text())
    assert any(k.startswith("deep_supervision_heads.") for k in report["shape_mismatch"])
    again = fresh_network(task_with_seven_classes(tmp_path))
    assert start_weights(again, tmp_path, "dynunet", None, 0, True, _Log()) == 2
    source = read_weights(tiny_model)[0]
    assert all(torch.equal(again.state_dict()[k], source[k]) for k in report["loaded"])
