"""A training run's folder: checkpoints, metrics table, training curve, TensorBoard events and log.

Everything is written atomically (temporary file, then rename), so a run killed at any moment, even
with SIGKILL, leaves the previous checkpoint intact and `--resume` can go on from it.
"""

from __future__ import annotations

import csv
import io
import logging
import random
import sys
from pathlib import Path

import numpy as np
import torch

from medseg.io import atomic_path, write_text


def rng_state() -> dict:
    """Random states of torch, NumPy and Python as tensors and lists (loadable with weights_only)."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "numpy_key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
        "numpy_pos": int(numpy_state["state"]["pos"]),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state({"bit_generator": "MT19937", "has_gauss": 0, "gauss": 0.0,
                         "state": {"key": state["numpy_key"].numpy().astype(np.uint32), "pos": state["numpy_pos"]}})
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class MetricsTable:
    """metrics.csv: one row per epoch; validation columns are empty in epochs without validation."""

    def __init__(self, path: Path, organs: list[str]):
        self.path = path
        self.columns = ["epoch", "step", "train_loss", *[f"dice_{o}" for o in organs], "mean_dice", "lr", "seconds",
                        "step_seconds", "validation_seconds"]
        self.rows: list[dict] = []
        if path.is_file():
            with path.open(newline="") as handle:
                self.rows = list(csv.DictReader(handle))

    def append(self, row: dict) -> None:
        self.rows = [r for r in self.rows if int(r["epoch"]) < int(row["epoch"])]  # a resumed epoch replaces its row
        self.rows.append({k: _fmt(row.get(k)) for k in self.columns})
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.columns)
        writer.writeheader()
        writer.writerows(self.rows)
        write_text(buffer.getvalue(), self.path)

    def plot(self, path: Path) -> None:
        """Training curve PNG: loss on the left axis, validation Dice on the right."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [int(r["epoch"]) for r in self.rows]
        losses = [float(r["train_loss"]) for r in self.rows]
        validated = [(int(r["epoch"]), float(r["mean_dice"])) for r in self.rows if r.get("mean_dice")]
        figure, left = plt.subplots(figsize=(7, 4), dpi=100)
        left.plot(epochs, losses, color="tab:blue", label="training loss")
        left.set_xlabel("epoch")
        left.set_ylabel("training loss", color="tab:blue")
        if validated:
            right = left.twinx()
            right.plot(*zip(*validated), "o-", color="tab:red", label="validation mean Dice")
            right.set_ylabel("validation mean Dice", color="tab:red")
            right.set_ylim(0, 1)
        left.set_title("training curve")
        figure.tight_layout()
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png")
        plt.close(figure)


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def make_logger(folder: Path) -> logging.Logger:
    """Log to train.log in the run folder and to stderr, one plain line per event."""
    logger = logging.getLogger(f"medseg.train.{folder}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    file_handler = logging.FileHandler(folder / "train.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(file_handler)
    logger.addHandler(console)
    return logger


def silent_logger() -> logging.Logger:
    """The logger of a rank other than 0: rank 0 alone reports a distributed run."""
    logger = logging.getLogger("medseg.train.silent")
    logger.propagate = False
    logger.disabled = True
    return logger


class TensorBoard:
    """TensorBoard scalars, when the tensorboard package is importable (it is a dependency)."""

    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # a trimmed install: the CSV and PNG still describe the run
            self.writer = None
        else:
            self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
