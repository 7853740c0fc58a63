"""Task files: one declarative YAML/JSON file per task, parsed once into frozen, typed config objects.

A task file under `pipelines/` (or any path) says everything about a segmentation problem: labels,
modality, spacing, intensities, patch size, sampling, augmentation, network, loss, optimiser, schedule
and inference. Unknown keys and bad values fail here, naming the file and the key, so that a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medseg.errors import ConfigError, InputError
from medseg.schema import build

PACKAGE_DIR = Path(__file__).resolve().parent

# A colour per label id when the task gives none: distinct, readable on grey CT (Glasbey-like).
CASE_ORGAN = "all"  # organ name of per-case rows in reports (pixel accuracy): no organ may take it
DEFAULT_COLORS = (
    (230, 25, 75), (255, 225, 25), (245, 130, 48), (60, 180, 75), (0, 130, 200), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
)


@dataclass(frozen=True)
class Label:
    id: int  # voxel value in label maps, 1..255
    name: str  # organ name, used as the key in every report
    color: tuple[int, int, int] = (255, 0, 0)  # RGB for overlays and viewers
    tolerance_mm: float | None = None  # surface Dice tolerance (inter-observer variation); None: the 2 mm fallback
    tg263: str | None = None  # AAPM TG-263 structure name (Parotid_L) for RTSTRUCT/DICOM-SEG; None: the organ name


@dataclass(frozen=True)
class Intensity:
    # CT: clip to this HU window before normalising; None clips to the dataset's foreground
    # 0.5/99.5 percentiles instead (nnU-Net's CT scheme). Ignored for MR.
    window: tuple[float, float] | None = None
    # dataset: subtract the training set's foreground mean and divide by its std (CT);
    # image: per-image z-score (MR); none: leave values as they are.
    normalize: Literal["dataset", "image", "none"] = "dataset"
    # (level, width) used to display the scan in overlays: soft tissue W400/L40 for the pelvis.
    display: tuple[float, float] = (40.0, 400.0)


@dataclass(frozen=True)
class Sampling:
    samples_per_volume: int = 8  # patches drawn from one volume before moving to the next
    queue_length: int = 64  # patches held in the TorchIO queue
    # share of patches centred on an organ voxel; the rest are centred anywhere in the volume
    foreground_probability: float = 0.67
    # relative weight of each organ among organ-centred patches; small organs need their share
    label_weights: dict[str, float] | None = None
    # partially labelled data: draw a case as often as its least-contoured organ needs (N / n, n of the
    # N cases contouring it), so an organ drawn in a third of the cases is not learnt three times slower
    balance_contoured: bool = False
    num_workers: int = 0  # loader processes; 0 keeps everything in the main process (2-core CPUs)


@dataclass(frozen=True)
class AffineAug:
    p: float = 0.2  # probability per patch
    degrees: float = 10.0  # rotation range, each axis
    scales: float = 0.1  # isotropic scaling range 1 +/- scales


@dataclass(frozen=True)
class ElasticAug:
    p: float = 0.1
    num_control_points: int = 7
    max_displacement: float = 5.0  # mm


@dataclass(frozen=True)
class FlipAug:
    p: float = 0.5
    # patient axes to flip: LR, AP, SI. A left-right flip swaps the task's paired organs.
    axes: tuple[str, ...] = ("LR",)


@dataclass(frozen=True)
class NoiseAug:
    p: float = 0.15
    std: float = 0.1  # in normalised intensity units


@dataclass(frozen=True)
class BlurAug:
    p: float = 0.1
    std: tuple[float, float] = (0.5, 1.0)  # mm


@dataclass(frozen=True)
class GammaAug:
    p: float = 0.15
    log_gamma: float = 0.3


@dataclass(frozen=True)
class ContrastAug:
    p: float = 0.15
    range: tuple[float, float] = (0.75, 1.25)  # multiply deviations from the patch mean


@dataclass(frozen=True)
class Augmentation:
    """Each entry present in the task file is switched on; absent ones are off."""

    affine: AffineAug | None = None
    elastic: ElasticAug | None = None
    flip: FlipAug | None = None
    noise: NoiseAug | None = None
    blur: BlurAug | None = None
    gamma: GammaAug | None = None
    contrast: ContrastAug | None = None


@dataclass(frozen=True)
class Network:
    # deeplab: residual atrous encoder + ASPP + DeepLabv3+ decoder, output stride 8 (medseg.model.deeplab)
    name: Literal["dynunet", "unet", "segresnet", "swinunetr", "deeplab"] = "dynunet"
    # feature maps per resolution level; nnU-Net uses 32..320, a narrower net trains on a CPU
    filters: tuple[int, ...] = (16, 32, 64, 128, 256)
    deep_supervision: bool = True  # DynUNet only: extra heads at lower resolutions, weighted 1/2^k
    dropout: float = 0.0


@dataclass(frozen=True)
class Loss:
    name: Literal["dice_ce"] = "dice_ce"
    dice_weight: float = 1.0
    ce_weight: float = 1.0


@dataclass(frozen=True)
class Optimizer:
    name: Literal["sgd", "adamw"] = "sgd"  # sgd: Nesterov SGD with poly decay (nnU-Net)
    lr: float = 0.01
    momentum: float = 0.99
    weight_decay: float = 3e-5


@dataclass(frozen=True)
class Schedule:
    epochs: int = 50
    steps_per_epoch: int = 50
    batch_size: int = 2
    lr_schedule: Literal["poly", "cosine"] = "poly"
    poly_exponent: float = 0.9
    grad_clip: float = 12.0  # max gradient norm (nnU-Net)
    validate_every: int = 5  # epochs between full-volume validations (a time budget may space them further)
    validation_cases: int | None = None  # validate on at most this many of the held-out cases; None: all
    max_minutes: float | None = None  # wall-clock budget of the whole run; the LR schedule is fitted to it
    ema_decay: float | None = None  # validate and save an exponential moving average of the weights; None: off
    # with a time budget: the wider network (the filters, or half of them) that gets this many steps done
    # inside it, timed on this machine before training (medseg.train.budget.choose_width); None: the filters as given
    target_steps: int | None = None


@dataclass(frozen=True)
class Inference:
    overlap: float = 0.5  # sliding-window overlap
    fast_overlap: float = 0.25  # overlap used with --fast
    blending: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = 4  # windows per forward: batches keep conv3d on the fast oneDNN path
    tta: bool = False  # test-time flips by default
    largest_component: tuple[str, ...] = ()  # organs reduced to their largest connected component
    crop_to_body: bool = True  # CT: windows only over the body's bounding box (air > -500 HU is skipped)


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[Label, ...]
    modality: Literal["CT", "MR"] = "CT"
    channels: tuple[str, ...] = ("CT",)
    description: str = ""
    pairs: tuple[tuple[str, str], ...] = ()  # (left, right) organs swapped by a left-right flip
    ignore_label: int | None = None  # voxel value the loss ignores (nnU-Net convention)
    spacing: tuple[float, float, float] | Literal["auto"] = "auto"  # mm; auto: dataset median
    patch_size: tuple[int, int, int] = (96, 96, 48)  # voxels at the target spacing, RAS order
    intensity: Intensity = field(default_factory=Intensity)
    sampling: Sampling = field(default_factory=Sampling)
    augmentation: Augmentation = field(default_factory=Augmentation)
    network: Network = field(default_factory=Network)
    loss: Loss = field(default_factory=Loss)
    optimizer: Optimizer = field(default_factory=Optimizer)
    schedule: Schedule = field(default_factory=Schedule)
    inference: Inference = field(default_factory=Inference)
    # bundled dataset under sample_data/ used when `medseg train` is given no --data
    sample_data: str | None = None

    @property
    def label_names(self) -> dict[int, str]:
        return {label.id: label.name for label in self.labels}

    @property
    def num_classes(self) -> int:
        """Output channels of the network: background plus the highest label id."""
        return max(label.id for label in self.labels) + 1

    def label_id(self, name: str) -> int:
        for label in self.labels:
            if label.name == name:
                return label.id
        raise ConfigError(f"task '{self.name}' has no organ named '{name}' (organs: {', '.join(self.label_names.values())})")

    def mirrored_order(self) -> tuple[int, ...]:
        """Label and channel order after a left-right flip: entry i is the partner of organ i (itself if
        unpaired). The one left/right swap: a label map is relabelled with it as a lookup table, and
        channels (logits, contoured masks) are reordered with it as an index."""
        order = list(range(self.num_classes))
        for left, right in self.pairs:
            a, b = self.label_id(left), self.label_id(right)
            order[a], order[b] = b, a
        return tuple(order)


# --------------------------------------------------------------------------------------- parsing


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
    task = build(Task, raw, source)
    _check(task, source)
    return task


def _check(task: Task, source: str) -> None:
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
    known = set(names)
    for i, pair in enumerate(task.pairs):
        for name in pair:
            if name not in known:
                raise ConfigError(f"{source}: key 'pairs[{i}]' names '{name}', which is not an organ of this task")
    if task.ignore_label is not None and not 1 <= task.ignore_label <= 255 or task.ignore_label in task.label_names:
        raise ConfigError(f"{source}: key 'ignore_label' must be a label value in 1..255 that no organ uses, "
                          f"got {task.ignore_label}")
    for name in list(task.inference.largest_component) + list(task.sampling.label_weights or {}):
        if name not in known:
            raise ConfigError(f"{source}: organ '{name}' in the inference/sampling settings is not an organ of this task")
    if isinstance(task.spacing, tuple) and min(task.spacing) <= 0:
        raise ConfigError(f"{source}: key 'spacing' must be positive millimetres or 'auto', got {task.spacing}")
    if min(task.patch_size) < 16:
        raise ConfigError(f"{source}: key 'patch_size' must be at least 16 voxels per axis, got {task.patch_size}")
    if task.intensity.window and task.intensity.window[0] >= task.intensity.window[1]:
        raise ConfigError(f"{source}: key 'intensity.window' must be [low, high] with low < high")
    if not 0 <= task.inference.overlap < 1 or not 0 <= task.inference.fast_overlap < 1:
        raise ConfigError(f"{source}: key 'inference.overlap' must be in [0, 1)")
    if not 0 <= task.sampling.foreground_probability <= 1:
        raise ConfigError(f"{source}: key 'sampling.foreground_probability' must be in [0, 1]")
    if task.augmentation.flip:
        for axis in task.augmentation.flip.axes:
            if axis not in ("LR", "AP", "SI"):
                raise ConfigError(f"{source}: key 'augmentation.flip.axes' must list LR, AP or SI, got {axis!r}")
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


# ------------------------------------------------------------------------------------- discovery


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
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        if path.suffix == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as error:  # json.JSONDecodeError or yaml.YAMLError: both mean a malformed file
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
