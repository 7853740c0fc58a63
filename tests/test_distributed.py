"""Several processes: the torchrun world, DDP training with two gloo processes on the CPU, and
prediction shared among them. Each rank runs the real CLI in `torchrun_worker.py`, which records the
files that rank wrote and the digest of its network's weights."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchrun_worker import weights_digest

import medseg
from medseg.cli import main
from medseg.distributed import World, joined, torchrun_ranks, train_arguments
from medseg.train import TrainOptions

WORKER = Path(__file__).with_name("torchrun_worker.py")


def test_a_single_process_world_is_everything():
    world = World()
    assert world.is_main and world.shard(["a", "b", "c"]) == ["a", "b", "c"]
    assert world.gather({"x": 1}) == [{"x": 1}]
    assert world.max(2.5) == 2.5 and world.mean(2.5) == 2.5
    assert world.from_main(lambda: 7) == 7
    assert World(rank=1, size=3).shard(list(range(8))) == [1, 4, 7]


def test_torchrun_ranks_come_from_torchrun_variables():
    assert torchrun_ranks({}) is None
    assert torchrun_ranks({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    with pytest.raises(ValueError, match="torchrun variables must be integers, got RANK='x'"):
        torchrun_ranks({"RANK": "x", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})


def test_outside_torchrun_no_process_group_is_made():
    with joined("cpu", {}) as world:
        assert world == World(torch.device("cpu"))
        assert not torch.distributed.is_initialized()


def test_nproc_passes_every_option_to_torchrun():
    options = TrainOptions(task="tiny.yaml", out=Path("runs/x"), max_minutes=0.0, seed=0, resume=True)
    assert train_arguments(options) == ["train", "--task", "tiny.yaml", "--out", "runs/x", "--max-minutes", "0.0",
                                        "--device", "auto", "--seed", "0", "--folds", "5", "--fold", "0", "--resume",
                                        "--precision", "auto", "--freeze-encoder-epochs", "0"]
    assert train_arguments(TrainOptions(task="t", calibrate=False))[-1] == "--no-calibrate"  # on by default


def test_nproc_under_torchrun_is_an_error(monkeypatch, capsys):
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    assert main(["train", "--nproc", "2"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --nproc 2 starts torchrun, but this process already runs "
                                               "under torchrun; leave --nproc out and use torchrun's --nproc_per_node")


def torchrun(records: Path, *medseg_args: str) -> list[dict]:
    """Run the worker in 2 gloo processes; returns each rank's record."""
    records.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               str(records), *medseg_args]
    # the medseg under test first, then whatever the environment already had on the path
    path = [str(Path(medseg.__file__).parents[1])] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((records / f"rank{rank}.json").read_text()) for rank in range(2)]


def written_under(folder: Path, record: dict) -> set[str]:
    """Files a rank wrote in `folder`, relative to it, without the temporary files of atomic writes."""
    folder = folder.resolve()
    files = {Path(p).relative_to(folder) for p in record["written"] if Path(p).is_relative_to(folder)}
    return {str(p) for p in files if not (p.name.startswith(".") and ".tmp" in p.name)}


@pytest.mark.slow
def test_two_processes_train_one_model_and_share_prediction(tiny_dataset, tmp_path):
    root, task = tiny_dataset
    run = tmp_path / "run"
    ranks = torchrun(tmp_path / "train_records", "train", "--task", str(task), "--data", str(root), "--out", str(run),
                     "--epochs", "2", "--device", "cpu")

    state = torch.load(run / "last.pt", weights_only=True)
    assert ranks[0]["weights"] == ranks[1]["weights"] == weights_digest(state["model"])
    assert len(state["rng_ranks"]) == 2
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])  # own sampling per rank

    split = json.loads((run / "split.json").read_text())
    shard = split["train"][1::2] + split["validation"][1::2]
    assert written_under(run, ranks[1]) == {f"cache/{name}.pt" for name in shard}  # its share of the cache only
    files = {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}
    assert files == written_under(run, ranks[0]) | written_under(run, ranks[1])
    assert not written_under(run, ranks[0]) & written_under(run, ranks[1])
    assert {"config.json", "split.json", "best.pt", "last.pt", "metrics.csv", "training_curve.png",
            "train.log"} <= written_under(run, ranks[0])
    assert len(list((run / "tensorboard").iterdir())) == 1
    log = (run / "train.log").read_text()
    assert "shared among 2 processes" in log and log.count("epoch 2/2") == 1
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [row["epoch"] for row in rows] == ["1", "2"] and rows[-1]["mean_dice"] != ""

    out = tmp_path / "predictions"
    ranks = torchrun(tmp_path / "predict_records", "predict", str(root / "imagesTr"), "--out", str(out),
                     "--model", str(run), "--device", "cpu", "--no-overlays")
    cases = [f"blob_{i}" for i in range(6)]
    for rank in range(2):
        segmentations = {p for p in written_under(out, ranks[rank]) if p.endswith("_seg.nii.gz")}
        assert segmentations == {f"{case}_seg.nii.gz" for case in cases[rank::2]}  # case i on rank i % 2
    assert {"summary.json", "review.html"} <= written_under(out, ranks[0])
    assert not {"summary.json", "review.html"} & written_under(out, ranks[1])
    summary = json.loads((out / "summary.json").read_text())
    assert [row["case"] for row in summary["cases"]] == cases and summary["failed"] == []
