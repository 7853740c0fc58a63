"""The task's typed config: frozen dataclasses with a comment on every default (parsed by `medseg.config.parse`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from medseg.errors import ConfigError

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


PATIENT_AXES = {"LR": 0, "AP": 1, "SI": 2}  # a patient axis -> its array axis in the RAS volumes medseg holds


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
    # UNet only: a first level at the scan's own resolution (stride 1, as DynUNet's and nnU-Net's), where
    # MONAI's UNet otherwise strides its very first convolution; `filters` then lists one more level.
    # (headneck, 45 minutes: 0.669 with [8, 16, ..., 256] against 0.678; benchmarks/results/headneck-probes-amx-c)
    full_resolution: bool = False


@dataclass(frozen=True)
class Loss:
    name: Literal["dice_ce"] = "dice_ce"
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    # True: each organ's Dice over the whole batch (nnU-Net's batch Dice). False: per case, over the
    # cases whose patch holds the organ, so a small organ cut by a patch weighs as much as a whole one
    # (headneck, 20 minutes: 0.660 held-out against 0.670; benchmarks/results/headneck-probes-amx-c).
    batch_dice: bool = True


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
    # 2: 2D images (PNG, TIFF, 2D NIfTI/MHA), held inside medseg as volumes with a singleton third axis
    # (X, Y, 1), TorchIO's convention, so grids, sampling and sliding windows are those of 3D
    dimensions: Literal[2, 3] = 3
    # mm; auto: dataset median. A 2D task may write two values; the third is stored as 1.0
    spacing: tuple[float, float, float] | Literal["auto"] = "auto"
    # voxels at the target spacing, RAS order. A 2D task may write two values (the third is stored as 1);
    # its default is [256, 256]
    patch_size: tuple[int, int, int] = (96, 96, 48)
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
    instances: tuple[str, ...] = ()  # labels whose connected objects are separate instances (nuclei, lesions)

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

    def flip_axes(self) -> tuple[int, ...]:
        """The array axes (RAS: 0 left-right, 1 front-back, 2 head-foot) that training flips along: the
        only mirror images a model has seen, and so the only ones test-time flips may show it."""
        return tuple(PATIENT_AXES[a] for a in self.augmentation.flip.axes) if self.augmentation.flip else ()

    def mirrored_order(self) -> tuple[int, ...]:
        """Label and channel order after a left-right flip: entry i is the partner of organ i (itself if
        unpaired). The one left/right swap: a label map is relabelled with it as a lookup table, and
        channels (logits, contoured masks) are reordered with it as an index."""
        order = list(range(self.num_classes))
        for left, right in self.pairs:
            a, b = self.label_id(left), self.label_id(right)
            order[a], order[b] = b, a
        return tuple(order)
