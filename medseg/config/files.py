"""Where tasks and bundled data live, and reading task and labels files from disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medseg.config.parse import parse_task
from medseg.config.task import CASE_ORGAN, Task
from medseg.errors import ConfigError, InputError

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # medseg/


def pipelines_dirs() -> list[Path]:
    """Where named tasks live: inside the installed package, or pipelines/ of a source checkout."""
    return [d for d in (PACKAGE_DIR / "pipelines", PACKAGE_DIR.parent / "pipelines") if d.is_dir()]


def sample_data_dir(name: str) -> Path:
    """A bundled dataset under sample_data/, installed or in a source checkout."""
    for base in (PACKAGE_DIR / "sample_data", PACKAGE_DIR.parent / "sample_data"):
        if (base / name).is_dir():
            return base / name
    raise ConfigError(f"bundled sample data '{name}' is not installed; pass --data PATH to a dataset")


def available_tasks() -> list[str]:
    names = set()
    for folder in pipelines_dirs():
        names.update(p.stem for p in folder.iterdir() if p.suffix in (".yaml", ".yml", ".json"))
    return sorted(names)


def read_mapping(path: Path) -> Any:
    """Read a YAML or JSON file, turning syntax errors into one-line messages."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}") from None
    import yaml

    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:  # json.JSONDecodeError is a ValueError: a malformed file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({first_line})") from None


def load_task(name_or_path: str | Path) -> Task:
    """Load a task by name (`prostate`, from pipelines/) or by path to a YAML/JSON file."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    looks_like_path = path.suffix in (".yaml", ".yml", ".json") or "/" in text
    if not looks_like_path:
        found = [f / f"{text}{suffix}" for f in pipelines_dirs() for suffix in (".yaml", ".yml", ".json")]
        if not (found := [p for p in found if p.is_file()]):
            raise ConfigError(f"unknown task '{text}' (available: {', '.join(available_tasks()) or 'none'}; "
                              "or pass a path to a task .yaml file)")
        path = found[0]
    if not path.is_file():
        raise ConfigError(f"task file not found: {path}")
    return parse_task(read_mapping(path), str(path))


def read_labels_file(path: str | Path) -> dict[int, str]:
    """Organ names from a JSON/YAML file: `{"1": "prostate"}`, nnU-Net's `{"prostate": 1}`, or a
    dataset.json holding either under "labels". Label 0 (background) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: labels file not found")
    raw = read_mapping(path)
    if isinstance(raw, dict) and isinstance(raw.get("labels"), dict):
        raw = raw["labels"]
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"{path}: expected a mapping of label id to organ name, "
                         "e.g. {\"1\": \"prostate\"}")
    organs: dict[int, str] = {}
    for key, value in raw.items():
        if isinstance(value, str) and str(key).strip().isdigit():
            label, name = int(key), value
        elif isinstance(value, int) and not isinstance(value, bool) and not str(key).strip().isdigit():
            label, name = value, key
        else:
            raise InputError(f"{path}: key '{key}' must map a label id to an organ name "
                             f"(or an organ name to a label id), got {value!r}")
        if label == 0:
            continue
        if not 1 <= label <= 255:
            raise InputError(f"{path}: key '{key}': label id {label} is outside 1..255")
        if label in organs or name in organs.values() or name == CASE_ORGAN:
            raise InputError(f"{path}: key '{key}': label {label} or organ name '{name}' "
                             "is repeated or reserved")
        organs[label] = name
    if not organs:
        raise InputError(f"{path}: names no organ (only background)")
    return dict(sorted(organs.items()))
