"""Datasets on disk: find the cases of a folder (`medseg.fingerprint` checks and fingerprints them).

Three layouts are read, detected in this order:

- MSD (Medical Segmentation Decathlon): `dataset.json` lists `training` entries
  `{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}` and `test` entries (plain paths
  as in the original MSD, or entries with an image and a label). An entry may add
  `"contoured": [organ, ...]` when only those organs were drawn (partial labels); `"image"` may be a
  list of files, one per channel.
- nnU-Net v2 raw: `dataset.json` with `channel_names`, `labels` and `file_ending`; images
  `imagesTr/{case}_{channel:04d}{file_ending}`, labels `labelsTr/{case}{file_ending}`, test images in
  `imagesTs/` (labels in `labelsTs/` where present).
- plain: `images/` and `labels/` matched by case name; channels as `{case}_0000`, `{case}_0001`, ...

Paths in a `dataset.json` must stay inside the dataset folder. They are normalised lexically, so
`../x` is refused while a symlink kept inside the folder (common in nnU-Net setups) is followed.

"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import InputError
from medseg.io import case_name, is_image_path

LAYOUTS = ("MSD (dataset.json with 'training'), nnU-Net v2 raw (dataset.json with 'channel_names' and "
           "'file_ending') or plain (images/ and labels/ folders)")
LAYOUT_NAMES = {"msd": "MSD", "nnunet": "nnU-Net v2", "plain": "images/ + labels/"}
CHANNEL_SUFFIX = re.compile(r"(.+)_(\d{4})")  # `{case}_0001`: channel 1 of a case (nnU-Net naming)


@dataclass(frozen=True)
class Case:
    name: str
    images: tuple[Path, ...]  # one file (or DICOM folder) per channel, in channel order
    label: Path | None  # None for test cases without a reference
    contoured: tuple[str, ...] | None = None  # organs drawn in this case (partial labels); None: all


# ------------------------------------------------------------------------------------------ load


def load_dataset(root: str | Path, split: str = "train", problems: list[str] | None = None) -> list[Case]:
    """The cases of a dataset folder in any of the three layouts.

    Args:
        root: the dataset folder.
        split: "train" (cases with labels) or "test" (an empty list when the dataset has none).
        problems: collect instead of stopping (`medseg check-dataset`): a `dataset.json` entry that
            cannot be used (outside the folder, malformed, a file missing) or a repeated case name
            becomes one line in this list and is left out; the other cases are returned.

    Raises:
        InputError: missing folder, unrecognised layout, malformed `dataset.json`, an entry outside the
            folder, a listed file that does not exist, an image without a label (plain layout); with
            `problems`, only what stops the whole dataset from being listed.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = absolute(root)
    layout, meta = detect_layout(root)
    if layout == "msd":
        cases = _load_msd(root, meta, split, problems)
    elif layout == "nnunet":
        cases = _load_nnunet(root, meta, split)
    else:
        cases = _load_plain(root) if split == "train" else []
    if problems is not None:
        return _usable(cases, root, problems)
    if split == "train" and not cases:
        raise InputError(f"{root}: the dataset has no training cases")
    missing = [p for case in cases for p in (*case.images, case.label) if p is not None and not p.exists()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise InputError(f"{root}: {len(missing)} file(s) of the dataset do not exist: "
                         f"{', '.join(_relative(p, root) for p in missing[:3])}{more}")
    seen: dict[str, Case] = {}
    for case in cases:
        if case.name in seen:
            raise InputError(f"{root}: two cases are named '{case.name}' "
                             f"({_relative(seen[case.name].images[0], root)}, {_relative(case.images[0], root)})")
        seen[case.name] = case
    return cases


def _usable(cases: list[Case], root: Path, problems: list[str]) -> list[Case]:
    """The cases whose files all exist and whose names are unique; one problem line for each other."""
    kept: dict[str, Case] = {}
    for case in cases:
        missing = [p for p in (*case.images, case.label) if p is not None and not p.exists()]
        if missing:
            problems += [f"{p}: listed in the dataset (case '{case.name}') but does not exist" for p in missing]
        elif case.name in kept:
            problems.append(f"{case.images[0]}: case name '{case.name}' is already taken by "
                            f"{_relative(kept[case.name].images[0], root)}")
        else:
            kept[case.name] = case
    return list(kept.values())


def absolute(path: str | Path) -> Path:
    """The path made absolute lexically (`..` resolved, symlinks kept)."""
    return Path(os.path.abspath(Path(path).expanduser()))


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def detect_layout(root: Path) -> tuple[str, dict | None]:
    """'msd', 'nnunet' or 'plain' (keys of LAYOUT_NAMES), and the dataset.json it read (None: plain)."""
    if not root.exists():
        raise InputError(f"{root}: no such dataset folder")
    if not root.is_dir():
        raise InputError(f"{root}: expected a dataset folder, got a file")
    meta_path = root / "dataset.json"
    if meta_path.is_file():
        meta = _read_json(meta_path)
        if "channel_names" in meta and "file_ending" in meta:
            return "nnunet", meta
        if "training" in meta:
            return "msd", meta
        raise InputError(f"{meta_path}: has no 'training' list (MSD) nor 'channel_names' and 'file_ending' "
                         "(nnU-Net v2)")
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return "plain", None
    raise InputError(f"{root}: no recognisable dataset layout; expected {LAYOUTS}")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object of keys to values, got {type(data).__name__}")
    return data


def _inside(root: Path, entry: Any, where: str) -> Path:
    """`entry` (relative to the dataset folder) as an absolute path, refused if it leaves the folder."""
    if not isinstance(entry, str) or not entry:
        raise InputError(f"{where} must be a file path, got {entry!r}")
    path = Path(os.path.normpath(root / entry))
    if not path.is_relative_to(root):
        raise InputError(f"{where} points outside the dataset folder: {entry}")
    return path


def _contoured(value: Any, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{where} must be a list of organ names, got {value!r}")
    return tuple(value)


def _load_msd(root: Path, meta: dict, split: str, problems: list[str] | None = None) -> list[Case]:
    """The MSD entries of `split`; with `problems`, an unusable entry is a line there instead of an error."""
    meta_path = root / "dataset.json"
    key = "training" if split == "train" else "test"
    entries = meta.get(key) or []
    if not isinstance(entries, list):
        raise InputError(f"{meta_path}: '{key}' must be a list of cases, got {type(entries).__name__}")
    cases = []
    for i, entry in enumerate(entries):
        try:
            cases.append(_msd_case(root, entry, f"{meta_path}: '{key}[{i}]", split))
        except InputError as error:
            if problems is None:
                raise
            problems.append(str(error))
    return cases


def _msd_case(root: Path, entry: Any, where: str, split: str) -> Case:
    """One MSD entry; `where` names it in errors (the key's closing quote is added where it is used)."""
    if isinstance(entry, str) and split == "test":
        entry = {"image": entry}
    if not isinstance(entry, dict) or "image" not in entry or (split == "train" and "label" not in entry):
        raise InputError(f"{where}' must be {{\"image\": PATH, \"label\": PATH}}, got {str(entry)[:80]}")
    listed = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
    if not listed:
        raise InputError(f"{where}.image' is an empty list")
    images = tuple(_inside(root, p, f"{where}.image'") for p in listed)
    if entry.get("label") is not None:
        label = _inside(root, entry["label"], f"{where}.label'")
    else:  # an original MSD test entry names only the image; a reference may sit in labelsTs/
        label = root / "labelsTs" / images[0].name
        label = label if split == "test" and label.is_file() else None
    return Case(case_name(images[0]), images, label, _contoured(entry.get("contoured"), f"{where}.contoured'"))


def _load_nnunet(root: Path, meta: dict, split: str) -> list[Case]:
    meta_path = root / "dataset.json"
    channels, ending = meta["channel_names"], meta["file_ending"]
    if not isinstance(channels, dict) or not channels or not all(str(k).isdigit() for k in channels):
        raise InputError(f"{meta_path}: 'channel_names' must map channel numbers to names, e.g. {{\"0\": \"CT\"}}, "
                         f"got {channels!r}")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise InputError(f"{meta_path}: 'file_ending' must be a file suffix such as \".nii.gz\", got {ending!r}")
    ids = sorted(int(k) for k in channels)
    images_dir = root / ("imagesTr" if split == "train" else "imagesTs")
    labels_dir = root / ("labelsTr" if split == "train" else "labelsTs")
    if not images_dir.is_dir():
        if split == "test":
            return []
        raise InputError(f"{images_dir}: no such folder (nnU-Net v2 keeps training images in imagesTr/)")
    first = f"_{ids[0]:04d}{ending}"
    names = sorted(p.name[: -len(first)] for p in images_dir.iterdir()
                   if p.name.endswith(first) and not p.name.startswith("."))
    cases = []
    for name in names:
        label = labels_dir / f"{name}{ending}"
        if split == "test" and not label.is_file():
            label = None
        cases.append(Case(name, tuple(images_dir / f"{name}_{c:04d}{ending}" for c in ids), label))
    return cases


def _image_entries(folder: Path) -> list[Path]:
    """Image files and (DICOM) folders, hidden files and other files left out."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and (p.is_dir() or is_image_path(p)))


def _load_plain(root: Path) -> list[Case]:
    images_dir, labels_dir = root / "images", root / "labels"
    labels = {case_name(p): p for p in _image_entries(labels_dir)}
    channels: dict[str, dict[int, Path]] = {}
    unmatched = []
    for path in _image_entries(images_dir):
        name, channel = case_name(path), 0
        match = CHANNEL_SUFFIX.fullmatch(name)
        if name not in labels and match and match[1] in labels:
            name, channel = match[1], int(match[2])
        elif name not in labels:
            unmatched.append(path)
            continue
        if channel in channels.setdefault(name, {}):
            raise InputError(f"{path}: case '{name}' already has channel {channel} ({channels[name][channel].name})")
        channels[name][channel] = path
    if unmatched:
        more = f" (and {len(unmatched) - 1} more images)" if len(unmatched) > 1 else ""
        raise InputError(f"{unmatched[0]}: no label of the same case name in {labels_dir}{more}")
    cases = []
    for name, files in sorted(channels.items()):
        if sorted(files) != list(range(len(files))):
            raise InputError(f"{images_dir}: case '{name}' has channels {sorted(files)}; expected "
                             f"{name}_0000, {name}_0001, ... with none missing")
        cases.append(Case(name, tuple(files[c] for c in sorted(files)), labels[name]))
    return cases
