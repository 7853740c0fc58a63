"""Task mappings (YAML, JSON, a model folder's config) validated once into a `Task`, naming file and key."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from medseg.config.task import DEFAULT_COLORS, Task
from medseg.errors import ConfigError
from medseg.schema import build

PATCH_2D = [256, 256]  # a 2D task's patch when its file gives none (the 3D default is Task.patch_size)


def _parse_labels(raw: Any, source: str) -> list[dict]:
    """Labels are written `id: name` or `id: {name: ..., color: [r, g, b], tolerance_mm: 2.5, tg263: Parotid_L}`."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: key 'labels' must be a mapping of label id to organ name, got {raw!r}")
    labels = []
    for key, value in raw.items():
        try:
            label_id = int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: key 'labels.{key}' must be an integer label id") from None
        if not 1 <= label_id <= 255:
            raise ConfigError(f"{source}: key 'labels.{key}' must be a label id in 1..255 (0 is background)")
        entry = {"name": value} if isinstance(value, str) else value
        if not isinstance(entry, dict):
            raise ConfigError(f"{source}: key 'labels.{key}' must be an organ name or {{name, color}}, got {value!r}")
        entry = {"color": list(DEFAULT_COLORS[(label_id - 1) % len(DEFAULT_COLORS)]), **entry, "id": label_id}
        labels.append(entry)
    return labels


def parse_task(raw: Any, source: str) -> Task:
    """Validate a task mapping (from YAML, JSON or a model folder) into a `Task`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a task file must be a mapping of keys to values, got {type(raw).__name__}")
    raw = dict(raw)
    raw["labels"] = _parse_labels(raw.get("labels"), source)
    if raw.get("dimensions") == 2:  # [X, Y] in a 2D task: the singleton third axis is implied
        raw.setdefault("patch_size", PATCH_2D)
        for key, singleton in (("patch_size", 1), ("spacing", 1.0)):
            if isinstance(raw.get(key), list | tuple) and len(raw[key]) == 2:
                raw[key] = [*raw[key], singleton]
    task = build(Task, raw, source)
    _check_labels(task, source)
    _check_organ_names(task, source)
    _check_values(task, source)
    return task


def _check_labels(task: Task, source: str) -> None:
    names = [label.name for label in task.labels]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: key 'labels' has a repeated organ name")
    for label in task.labels:
        if not all(0 <= c <= 255 for c in label.color):
            raise ConfigError(f"{source}: key 'labels.{label.id}.color' must be three values in 0..255")
        if label.tolerance_mm is not None and not 0 < label.tolerance_mm < float("inf"):
            raise ConfigError(f"{source}: key 'labels.{label.id}.tolerance_mm' must be a positive number of mm")
        if label.tg263 is not None and not re.fullmatch(r"[A-Za-z0-9_^ ]{1,16}", label.tg263):
            raise ConfigError(f"{source}: key 'labels.{label.id}.tg263' must be a TG-263 structure name: "
                              f"1-16 characters of A-Z a-z 0-9 _ ^ and space, got {label.tg263!r}")
    if task.ignore_label is not None and not 1 <= task.ignore_label <= 255 or task.ignore_label in task.label_names:
        raise ConfigError(f"{source}: key 'ignore_label' must be a label value in 1..255 that no organ uses, "
                          f"got {task.ignore_label}")


def _check_organ_names(task: Task, source: str) -> None:
    """Every organ named by another key (pairs, instances, inference, sampling) is one of the labels."""
    known = set(task.label_names.values())
    for i, pair in enumerate(task.pairs):
        for name in pair:
            if name not in known:
                raise ConfigError(f"{source}: key 'pairs[{i}]' names '{name}', which is not an organ of this task")
    for name in task.instances:
        if name not in known:
            raise ConfigError(f"{source}: key 'instances' names '{name}', which is not a label of this task")
    for name in list(task.inference.largest_component) + list(task.sampling.label_weights or {}):
        if name not in known:
            raise ConfigError(f"{source}: organ '{name}' in the inference/sampling settings is not an organ of this task")


def _check_values(task: Task, source: str) -> None:
    if isinstance(task.spacing, tuple) and min(task.spacing) <= 0:
        raise ConfigError(f"{source}: key 'spacing' must be positive millimetres or 'auto', got {task.spacing}")
    in_plane = task.patch_size[:task.dimensions]
    if task.dimensions == 2 and task.patch_size[2] != 1:
        raise ConfigError(f"{source}: key 'patch_size' of a 2D task must be [X, Y] (or [X, Y, 1]), got {task.patch_size}")
    if min(in_plane) < 16:
        raise ConfigError(f"{source}: key 'patch_size' must be at least 16 voxels per axis, got {task.patch_size}")
    if task.intensity.window and task.intensity.window[0] >= task.intensity.window[1]:
        raise ConfigError(f"{source}: key 'intensity.window' must be [low, high] with low < high")
    if not 0 <= task.inference.overlap < 1 or not 0 <= task.inference.fast_overlap < 1:
        raise ConfigError(f"{source}: key 'inference.overlap' must be in [0, 1)")
    if not 0 <= task.sampling.foreground_probability <= 1:
        raise ConfigError(f"{source}: key 'sampling.foreground_probability' must be in [0, 1]")
    if task.augmentation.flip:
        allowed = ("LR", "AP", "SI")[:task.dimensions]  # a 2D image has no head-foot axis to flip along
        for axis in task.augmentation.flip.axes:
            if axis not in allowed:
                raise ConfigError(f"{source}: key 'augmentation.flip.axes' must list {' or '.join(allowed)}, got {axis!r}")
    if task.schedule.epochs < 1 or task.schedule.steps_per_epoch < 1 or task.schedule.batch_size < 1:
        raise ConfigError(f"{source}: keys 'schedule.epochs', 'steps_per_epoch' and 'batch_size' must be >= 1")
    ema, cases = task.schedule.ema_decay, task.schedule.validation_cases
    if ema is not None and not 0 < ema < 1 or cases is not None and cases < 1:
        raise ConfigError(f"{source}: key 'schedule.ema_decay' must be in (0, 1) and 'schedule.validation_cases' >= 1")


def task_to_dict(task: Task) -> dict:
    """The task as plain JSON-able data that `parse_task` reads back to an equal `Task`."""
    data = dataclasses.asdict(task)
    data["labels"] = {str(label.id): {"name": label.name, "color": list(label.color), "tolerance_mm": label.tolerance_mm,
                                      "tg263": label.tg263} for label in task.labels}
    return data
