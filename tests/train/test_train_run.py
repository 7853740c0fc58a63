"""Training on tiny volumes: the run folder, a falling loss, and resuming after SIGKILL."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


def read_metrics(folder: Path) -> list[dict]:
    with (folder / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_run_folder_describes_itself(tiny_model):
    for name in ["config.json", "best.pt", "last.pt", "split.json", "metrics.csv", "training_curve.png", "train.log"]:
        assert (tiny_model / name).is_file(), name
    assert any((tiny_model / "tensorboard").glob("events.out.tfevents.*"))
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["task"]["name"] == "tiny"
    assert config["preprocessing"]["spacing"] == [3.0, 3.0, 3.0]
    assert config["network"]["name"] == "dynunet"
    assert set(config["split"]) == {"train", "validation"}
    state = torch.load(tiny_model / "best.pt", weights_only=True)
    assert "model" in state and all(torch.is_tensor(v) for v in state["model"].values())
    rows = read_metrics(tiny_model)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert rows[-1]["dice_femoral_head_left"] != ""  # validated at the last epoch
    assad = (tiny_model / "training_curve.png").read_bytes()[:8]
    assert assad == b"\x89PNG\r\n\x1a\n"


def train_command(task: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medseg", "train", "--task", str(task), "--data", str(data), "--out", str(out), *extra]


@pytest.mark.slow
def test_loss_falls_and_a_killed_run_resumes(tiny_dataset, tmp_path):
    root, task = tiny_dataset
    out = tmp_path / "run"
    process = subprocess.Popen(train_command(task, root, out, "--epochs", "8"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (out / "metrics.csv").is_file() or len(read_metrics(out)) < 2:
        assert process.poll() is None, process.stderr.read().decode()
        assert time.time() < deadline, "training made no progress"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = len(read_metrics(out))
    assert killed_at < 8

    done = subprocess.run(train_command(task, root, out, "--resume"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resumed from epoch" in (out / "train.log").read_text()
    rows = read_metrics(out)
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["progress"]["epoch"] == 8 and state["progress"]["step"] == 40
    assert not list(out.glob(".*.tmp*"))  # no half-written checkpoint left behind


def test_a_finished_run_resumed_trains_on_only_when_given_more(tiny_model, tiny_dataset, tmp_path):
    """A run that ended before its epochs (its budget spent) is finished: `--resume`, and `--fold all` over
    folds trained side by side, leave it as it is; more epochs or minutes on the command line continue it."""
    from medseg.train import TrainOptions, fit

    root, task = tiny_dataset
    run = tmp_path / "ended"
    shutil.copytree(tiny_model, run)
    config = json.loads((run / "config.json").read_text())
    config["epochs"] = 5  # as if the time budget had ended the run after 2 of 5 epochs
    (run / "config.json").write_text(json.dumps(config))
    assert torch.load(run / "last.pt", weights_only=True)["progress"]["finished"] is True

    fit(TrainOptions(task=task, data=root, out=run, resume=True))
    assert [int(r["epoch"]) for r in read_metrics(run)] == [1, 2]
    fit(TrainOptions(task=task, data=root, out=run, resume=True, epochs=3))
    assert [int(r["epoch"]) for r in read_metrics(run)] == [1, 2, 3]
    assert torch.load(run / "last.pt", weights_only=True)["progress"]["finished"] is True


def test_existing_run_is_not_overwritten(tiny_model, tiny_dataset):
    root, task = tiny_dataset
    result = subprocess.run(train_command(task, root, tiny_model), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "already holds a run; use --resume" in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_without_a_run_says_so(tmp_path):
    result = subprocess.run([sys.executable, "-m", "medseg", "train", "--resume", "--out", str(tmp_path / "nothing")],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path, env={**os.environ})
    assert result.returncode == 2
    assert "not a medseg run folder" in result.stderr
