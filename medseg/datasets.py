"""Datasets on disk: find the cases of a folder, check every file before training, fingerprint it.

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

The fingerprint follows nnU-Net's: spacings and shapes are given in RAS axis order (each voxel axis
moved to the closest of right, anterior, superior, as `nibabel.as_closest_canonical` and TorchIO's
`ToCanonical` do) because training resamples every scan to RAS first.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import Task
from medseg.errors import InputError
from medseg.io import Grid, case_name, is_image_path, read_image, read_label, write_text

LAYOUTS = ("MSD (dataset.json with 'training'), nnU-Net v2 raw (dataset.json with 'channel_names' and "
           "'file_ending') or plain (images/ and labels/ folders)")
LAYOUT_NAMES = {"msd": "MSD", "nnunet": "nnU-Net v2", "plain": "images/ + labels/"}
FOREGROUND_SAMPLES = 10_000  # foreground voxels drawn per case for intensity statistics
CHANNEL_SUFFIX = re.compile(r"(.+)_(\d{4})")  # `{case}_0001`: channel 1 of a case (nnU-Net naming)


@dataclass(frozen=True)
class Case:
    name: str
    images: tuple[Path, ...]  # one file (or DICOM folder) per channel, in channel order
    label: Path | None  # None for test cases without a reference
    contoured: tuple[str, ...] | None = None  # organs drawn in this case (partial labels); None: all


# ------------------------------------------------------------------------------------------ load


def load_dataset(root: str | Path, split: str = "train") -> list[Case]:
    """The cases of a dataset folder in any of the three layouts.

    Args:
        root: the dataset folder.
        split: "train" (cases with labels) or "test" (an empty list when the dataset has none).

    Raises:
        InputError: missing folder, unrecognised layout, malformed `dataset.json`, an entry outside the
            folder, a listed file that does not exist, an image without a label (plain layout).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = _absolute(root)
    layout, meta = _detect(root)
    if layout == "msd":
        cases = _load_msd(root, meta, split)
    elif layout == "nnunet":
        cases = _load_nnunet(root, meta, split)
    else:
        cases = _load_plain(root) if split == "train" else []
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


def _absolute(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _detect(root: Path) -> tuple[str, dict | None]:
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


def _load_msd(root: Path, meta: dict, split: str) -> list[Case]:
    meta_path = root / "dataset.json"
    key = "training" if split == "train" else "test"
    entries = meta.get(key) or []
    if not isinstance(entries, list):
        raise InputError(f"{meta_path}: '{key}' must be a list of cases, got {type(entries).__name__}")
    cases = []
    for i, entry in enumerate(entries):
        where = f"{meta_path}: '{key}[{i}]"  # the key's closing quote is added where it is used
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
        cases.append(Case(case_name(images[0]), images, label, _contoured(entry.get("contoured"), f"{where}.contoured'")))
    return cases


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


# ----------------------------------------------------------------------------------- fingerprint


@dataclass
class _CaseStats:
    spacing: np.ndarray  # (3,) mm, RAS axis order
    shape: np.ndarray  # (3,) voxels, RAS axis order
    foreground: np.ndarray  # (C, N) intensities of up to FOREGROUND_SAMPLES organ voxels
    volume_ml: dict[str, float]  # organ -> volume in this case


def _ras_axes(grid: Grid) -> list[int]:
    """For each RAS axis, the voxel axis closest to it."""
    from nibabel.orientations import io_orientation

    order = [0, 0, 0]
    for voxel_axis, (ras_axis, _flip) in enumerate(io_orientation(grid.ras_affine)):
        order[int(ras_axis)] = voxel_axis
    return order


def _case_stats(image: np.ndarray, grid: Grid, label: np.ndarray, task: Task, seed: int) -> _CaseStats:
    axes = _ras_axes(grid)
    foreground = label > 0
    if task.ignore_label is not None:
        foreground &= label != task.ignore_label
    index = np.flatnonzero(foreground)
    if len(index) > FOREGROUND_SAMPLES:
        index = np.sort(np.random.default_rng(seed).choice(index, FOREGROUND_SAMPLES, replace=False))
    counts = np.bincount(label.ravel(), minlength=256)
    return _CaseStats(spacing=np.asarray(grid.spacing)[axes], shape=np.asarray(grid.shape)[axes],
                      foreground=image.reshape(len(image), -1)[:, index],
                      volume_ml={lab.name: float(counts[lab.id]) * grid.voxel_volume_ml for lab in task.labels})


def _intensity(values: np.ndarray) -> dict[str, float | None]:
    if not values.size:  # no organ voxels anywhere: nothing to normalise with
        return dict.fromkeys(("mean", "std", "p00_5", "p99_5", "min", "max"))
    low, high = np.percentile(values, [0.5, 99.5])
    return {"mean": float(values.mean()), "std": float(values.std()), "p00_5": float(low), "p99_5": float(high),
            "min": float(values.min()), "max": float(values.max())}


def _mm(values: np.ndarray) -> list[float]:
    return np.round(values, 6).tolist()  # NIfTI keeps float32 spacings: 0.8999999761 -> 0.9


def _summarise(stats: list[_CaseStats], task: Task) -> dict:
    if not stats:
        return {"num_cases": 0}
    spacing = np.array([s.spacing for s in stats], dtype=float)
    shape = np.array([s.shape for s in stats], dtype=float)
    median_spacing = np.median(spacing, axis=0)
    volumes = {}
    for organ in (lab.name for lab in task.labels):
        present = [s.volume_ml[organ] for s in stats if s.volume_ml[organ] > 0]
        volumes[organ] = float(np.median(present)) if present else None
    return {
        "num_cases": len(stats),
        "axes": "RAS",  # spacing and shape axis order: after reorienting to the closest RAS
        "median_spacing": _mm(median_spacing),
        "median_shape": np.median(shape, axis=0).tolist(),
        "median_shape_at_median_spacing": np.median(np.round(shape * spacing / median_spacing), axis=0).tolist(),
        "spacing_min": _mm(spacing.min(0)),
        "spacing_max": _mm(spacing.max(0)),
        "shape_min": shape.min(0).astype(int).tolist(),
        "shape_max": shape.max(0).astype(int).tolist(),
        "foreground_intensity": [_intensity(np.concatenate([s.foreground[c] for s in stats]))
                                 for c in range(len(task.channels))],
        "organ_volume_ml": volumes,  # median over the cases where the organ is present; None if in none
    }


def _check_case(case: Case, task: Task, seed: int) -> tuple[list[str], _CaseStats | None]:
    """Problems with one case (each a line naming the file), and its statistics if it has none."""
    problems = []
    if len(case.images) != len(task.channels):
        problems.append(f"{case.images[0]}: case '{case.name}' has {len(case.images)} image channel(s), task "
                        f"'{task.name}' expects {len(task.channels)} ({', '.join(task.channels)})")
    organs = [lab.name for lab in task.labels]
    for organ in case.contoured or ():
        if organ not in organs:
            problems.append(f"{case.images[0]}: case '{case.name}' lists contoured organ '{organ}', which is not "
                            f"an organ of task '{task.name}' ({', '.join(organs)})")
    image = label = None
    try:
        image, grid = read_image(case.images)
    except InputError as error:
        problems.append(str(error))
    if case.label is not None:
        try:
            label, label_grid = read_label(case.label)
        except InputError as error:
            problems.append(str(error))
    if image is None or label is None:
        return problems, None
    if not grid.matches(label_grid):
        problems.append(f"{case.label}: label grid ({label_grid.describe()}) differs from the image's "
                        f"({grid.describe()})")
        return problems, None
    allowed = {0, *task.label_names} | ({task.ignore_label} if task.ignore_label is not None else set())
    present = [int(v) for v in np.flatnonzero(np.bincount(label.ravel(), minlength=256))]
    unknown = [v for v in present if v not in allowed]
    if unknown:
        problems.append(f"{case.label}: label value(s) {', '.join(map(str, unknown))} are not labels of task "
                        f"'{task.name}' (expected {', '.join(map(str, sorted(allowed)))})")
    if case.contoured is not None:
        drawn = [task.label_names[v] for v in present if v in task.label_names]
        extra = [organ for organ in drawn if organ not in case.contoured]
        if extra:
            problems.append(f"{case.label}: has voxels of {', '.join(extra)}, which its 'contoured' list leaves out")
    return problems, (None if problems else _case_stats(image, grid, label, task, seed))


def compute_fingerprint(cases: list[Case], task: Task) -> dict:
    """Dataset statistics that planning and normalisation need (as nnU-Net's dataset fingerprint).

    Keys: `num_cases`; `median_spacing`, `spacing_min`, `spacing_max` (mm) and `median_shape`,
    `median_shape_at_median_spacing`, `shape_min`, `shape_max` (voxels), all in RAS axis order;
    `foreground_intensity`, per channel, `mean`, `std`, `p00_5`, `p99_5`, `min`, `max` over up to
    10,000 sampled organ voxels per case; `organ_volume_ml`, organ -> median volume.

    Raises:
        InputError: the first problem of the first case that has one (`check_dataset` lists them all).
    """
    stats = []
    for index, case in enumerate(cases):
        problems, case_stats = _check_case(case, task, seed=index)
        if problems:
            raise InputError(f"{problems[0]} (run `medseg check-dataset` to list every problem)")
        if case_stats is None:
            raise InputError(f"{case.images[0]}: case '{case.name}' has no label map to take statistics from")
        stats.append(case_stats)
    if not stats:
        raise InputError("no cases to compute a dataset fingerprint from")
    if not any(s.foreground.size for s in stats):
        raise InputError(f"{cases[0].label.parent}: no label map has any organ voxel; nothing to learn from")
    return _summarise(stats, task)


# ----------------------------------------------------------------------------------------- check


@dataclass
class DatasetReport:
    root: Path
    layout: str  # "MSD", "nnU-Net v2" or "images/ + labels/"
    task: str
    num_cases: int  # training cases found (test cases are checked but not counted)
    problems: list[str] = field(default_factory=list)  # one line each, naming the file
    fingerprint: dict = field(default_factory=dict)  # see `compute_fingerprint`; from problem-free cases
    fingerprint_path: Path | None = None  # where the fingerprint was written; None: not written

    def summary(self) -> str:
        fp = self.fingerprint
        lines = [f"{self.root}: {self.layout} dataset, {self.num_cases} training cases, task '{self.task}'"]
        if fp.get("num_cases"):
            of = "" if fp["num_cases"] == self.num_cases else f" (over the {fp['num_cases']} cases without problems)"
            lines.append(f"spacing (mm, RAS): {_xyz(fp['spacing_min'])} to {_xyz(fp['spacing_max'])}, "
                         f"median {_xyz(fp['median_spacing'])}{of}")
            lines.append(f"size (voxels, RAS): {_xyz(fp['shape_min'])} to {_xyz(fp['shape_max'])}, "
                         f"median {_xyz(fp['median_shape'])}")
        lines += [f"problem: {p}" for p in self.problems]
        if self.fingerprint_path:
            lines.append(f"fingerprint: {self.fingerprint_path}")
        else:
            lines.append("fingerprint not written: fix the problems first")
        n = len(self.problems)
        lines.append(f"{n} problem{'s' if n != 1 else ''}" if n else "OK")
        return "\n".join(lines)


def _xyz(values: list[float]) -> str:
    return "x".join(f"{v:.3g}" for v in values)


def default_fingerprint_path(root: str | Path) -> Path:
    """`./<dataset folder name>_fingerprint.json`: in the working folder, never inside the dataset."""
    return Path.cwd() / f"{_absolute(root).name or 'dataset'}_fingerprint.json"


def _fingerprint_target(root: Path, given: str | Path | None) -> Path:
    """Where to write the fingerprint, refused up front if that cannot work (before minutes of reading)."""
    path = default_fingerprint_path(root) if given is None else _absolute(given)
    if path.is_dir():
        path = path / default_fingerprint_path(root).name
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"cannot write {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise InputError(f"cannot write {path}: folder {parent} is not writable")
            break
    return path


def check_dataset(root: str | Path, task: Task, fingerprint_path: str | Path | None = None) -> DatasetReport:
    """Check every case of a dataset against a task, collecting all problems, and fingerprint it.

    Each file must read as a 3D image without NaN/inf, each case must have the task's channels, a label
    map on the image's grid with only the task's label values (plus 0 and `ignore_label`), and
    `contoured` organs that the task knows. Test cases, where the dataset has some, are checked too.
    The fingerprint (training cases) is written as JSON to `fingerprint_path` (a file, or a folder
    to write `<dataset>_fingerprint.json` in; default `default_fingerprint_path(root)`) only when
    there is no problem. The dataset folder itself is never written to.

    Raises:
        InputError: the dataset cannot be listed (see `load_dataset`) or the fingerprint cannot be written.
    """
    root = _absolute(root)
    target = _fingerprint_target(root, fingerprint_path)
    layout, _ = _detect(root)
    cases = load_dataset(root, "train")
    problems, stats = [], []
    for index, case in enumerate(cases):
        case_problems, case_stats = _check_case(case, task, seed=index)
        problems += case_problems
        if case_stats is not None:
            stats.append(case_stats)
    for case in load_dataset(root, "test"):
        problems += _check_case(case, task, seed=0)[0]
    fingerprint = _summarise(stats, task)
    if stats and not any(s.foreground.size for s in stats):
        problems.append(f"{root}: no label map has any organ voxel; nothing to learn from")
    prefix = f"{root}{os.sep}"
    problems = [" ".join(p.replace(prefix, "").split()) for p in problems]  # one line each, paths relative
    report = DatasetReport(root, LAYOUT_NAMES[layout], task.name, len(cases), problems, fingerprint)
    if not problems:
        report.fingerprint_path = write_text(json.dumps(fingerprint, indent=2) + "\n", target)
    return report
