"""A model folder: the run's typed configuration (config.json) and its checkpoints.

A folder describes itself, as nnU-Net's does: `config.json` holds the task, the preprocessing and the
network plan, so `medseg predict` needs the folder and nothing else, and `--resume` continues the same
run. Checkpoints hold tensors and plain containers only and load with `weights_only=True`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from medseg import __version__
from medseg.config import Task, parse_task, task_to_dict
from medseg.data.preprocess import Preprocessing
from medseg.errors import ConfigError, InputError
from medseg.io import atomic_path, write_text
from medseg.model.networks import NetworkPlan

CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class RunConfig:
    """What a trained model folder holds besides its weights; written once when a run starts."""

    task: Task
    preprocessing: Preprocessing  # spacing and intensity statistics fixed from the training set
    network: NetworkPlan  # the network rebuilt from this alone
    split: dict[str, list[str]]  # case names: "train" and "validation"
    data: str = ""  # absolute path of the dataset folder trained on
    folds: dict[str, int] = field(default_factory=dict)  # {"folds", "fold", "seed"} of the split
    fingerprint: dict[str, Any] = field(default_factory=dict)  # the training set's (medseg.data.fingerprint)
    epochs: int = 0  # planned epochs (the task's schedule unless overridden)
    max_minutes: float | None = None  # time budget; None: run every epoch
    network_choice: dict[str, Any] = field(default_factory=dict)  # the width and training layout, and why
    medseg_version: str = __version__
    created: str = field(default_factory=lambda: datetime.now().isoformat(timespec="seconds"))

    @property
    def channels_last(self) -> bool:
        """Whether training runs with channels-last weights (measured when the run was planned)."""
        return bool(self.network_choice.get("layout", {}).get("channels_last", False))

    def to_dict(self) -> dict:
        """Plain JSON data; `from_dict` reads it back to an equal RunConfig."""
        return {"medseg_version": self.medseg_version, "created": self.created, "task": task_to_dict(self.task),
                "data": self.data, "split": self.split, "folds": self.folds,
                "preprocessing": self.preprocessing.to_dict(), "network": self.network.to_dict(),
                "fingerprint": self.fingerprint, "epochs": self.epochs, "max_minutes": self.max_minutes,
                "network_choice": self.network_choice}

    @classmethod
    def from_dict(cls, raw: dict, source: str = CONFIG_NAME) -> RunConfig:
        """Read a config.json's data (also those written by earlier medseg versions, which hold the same keys).

        Raises:
            ConfigError: a required key is missing or malformed (the message names `source` and the key).
        """
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        missing = [key for key in ("task", "preprocessing", "network", "split") if key not in raw]
        if missing:
            raise ConfigError(f"{source}: missing key(s) {', '.join(missing)} (not a medseg model folder's config)")
        try:
            preprocessing = Preprocessing.from_dict(raw["preprocessing"])
            network = NetworkPlan.from_dict(raw["network"])
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"{source}: malformed 'preprocessing' or 'network' ({error})") from None
        optional = {f.name: raw[f.name] for f in dataclasses.fields(cls)
                    if f.name in raw and f.name not in ("task", "preprocessing", "network")}
        return cls(task=parse_task(raw["task"], source), preprocessing=preprocessing, network=network, **optional)

    def with_budget(self, epochs: int | None, max_minutes: float | None) -> RunConfig:
        """The same run with the epochs and/or time budget given on a `--resume` command line."""
        changes = {k: v for k, v in (("epochs", epochs), ("max_minutes", max_minutes)) if v}
        return dataclasses.replace(self, **changes)


def read_run_config(folder: str | Path) -> RunConfig:
    """The folder's config.json; a one-line error if the folder is not a model folder."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise InputError(f"{folder}: not a medseg model folder (no {CONFIG_NAME}; train one with `medseg train`)")
    return RunConfig.from_dict(read_folder_json(path), str(path))


def read_folder_json(path: Path):
    """One of a model folder's JSON files (config, calibration, post-processing), parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None


def write_run_config(config: RunConfig, folder: Path) -> Path:
    """config.json and split.json (the case names alone, for a reader who wants just those)."""
    write_text(json.dumps(config.split, indent=2), folder / "split.json")
    return write_text(json.dumps(config.to_dict(), indent=2), folder / CONFIG_NAME)


def save_checkpoint(path: Path, state: dict) -> None:
    """Written to a temporary name and renamed: a run killed at any moment leaves the last one intact."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    """Tensors and plain containers only: never unpickles code."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)
