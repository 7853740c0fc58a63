"""Sliding-window inference and the way back to the scan's own grid.

The network sees the scan preprocessed (RAS, model spacing, normalised). Its class probabilities are
then carried back to the input grid by trilinear interpolation, slab by slab, and only then turned into
labels: interpolating probabilities keeps boundaries smooth at the input's finer resolution, while
argmax-then-nearest-neighbour would paint model-sized stair steps onto the input voxels (the predict
benchmark measures both). Slab-wise resampling keeps memory at model size plus one slab, so a
512x512x300 CT never holds a float copy of every class on its own grid.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medseg.config import Task, parse_task
from medseg.errors import ConfigError, InputError
from medseg.io import Grid, read_image
from medseg.networks import NetworkPlan, build_network
from medseg.preprocess import Preprocessing, normalize_, to_model_grid
from medseg.runtime import autocast, prepare_network, resolve_precision

CONFIG_NAME = "config.json"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device '{device}' requested but no CUDA GPU is available (use --device cpu)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device '{device}' (expected auto, cpu, cuda or cuda:N)") from None


# ---------------------------------------------------------------------------------- model folder


@dataclass
class ModelBundle:
    """A trained model folder, loaded: everything prediction needs and nothing else."""

    folder: Path
    task: Task
    preprocessing: Preprocessing
    plan: NetworkPlan
    network: torch.nn.Module
    device: torch.device
    precision: str = "auto"  # 'bf16' or 'fp32' once loaded; see medseg.runtime.resolve_precision


def read_model_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise InputError(f"{folder}: not a medseg model folder (no {CONFIG_NAME}; train one with `medseg train`)")
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None


def load_model(folder: str | Path, device: str = "auto", checkpoint: str = "best",
               precision: str = "auto") -> ModelBundle:
    """Rebuild the network from the folder's config.json and load `best.pt` (or `last.pt`).

    The network is laid out for `device` and `precision` ('auto', 'bf16', 'fp32') by
    `medseg.runtime.prepare_network`.
    """
    folder = Path(folder)
    config = read_model_config(folder)
    task = parse_task(config["task"], str(folder / CONFIG_NAME))
    plan = NetworkPlan.from_dict(config["network"])
    weights = folder / f"{checkpoint}.pt"
    if not weights.is_file():
        weights = folder / "last.pt"
    if not weights.is_file():
        raise InputError(f"{folder}: no best.pt or last.pt checkpoint (training has not saved one yet)")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    network = build_network(plan)
    network.load_state_dict(state["model"])
    torch_device = resolve_device(device)
    precision = resolve_precision(precision, torch_device)
    prepare_network(network, torch_device, precision).eval()
    return ModelBundle(folder, task, Preprocessing.from_dict(config["preprocessing"]), plan, network, torch_device,
                       precision)


# ------------------------------------------------------------------------------- sliding window


def sliding_window_logits(network: torch.nn.Module, image: torch.Tensor, roi: Sequence[int], overlap: float,
                          sw_batch_size: int = 4, blending: str = "gaussian",
                          device: torch.device = torch.device("cpu"), precision: str = "auto") -> torch.Tensor:
    """Blend window logits over a whole volume.

    Windows go through the network `sw_batch_size` at a time: at batch 1 PyTorch sends the small
    convolutions of a window to its slow non-oneDNN path. Prepare the network with
    `medseg.runtime.prepare_network` for the fast kernels; in fp32 the result is the same either way.

    Args:
        image: (C, X, Y, Z) preprocessed volume.
        precision: 'auto', 'bf16' or 'fp32' (`medseg.runtime.resolve_precision`).
    Returns:
        (K, X, Y, Z) float32 logits on the CPU.
    """
    from monai.inferers import sliding_window_inference

    inputs = image[None].to(device=device, dtype=torch.float32)
    with torch.inference_mode(), autocast(device, precision):
        logits = sliding_window_inference(inputs, tuple(roi), sw_batch_size, network, overlap=overlap, mode=blending,
                                          padding_mode="replicate")
    return logits[0].float().cpu()


def flipped_logits(network: torch.nn.Module, image: torch.Tensor, swap: dict[int, int], flips: Sequence[tuple[int, ...]],
                   **window) -> torch.Tensor:
    """Average logits over mirrored copies; a left-right (axis 0 in RAS) flip swaps paired organs back."""
    total = None
    for axes in flips:
        dims = [a + 1 for a in axes]
        logits = sliding_window_logits(network, image.flip(dims) if dims else image, **window)
        if dims:
            logits = logits.flip(dims)
        if 0 in axes and swap:
            order = list(range(logits.shape[0]))
            for source, target in swap.items():
                order[source] = target
            logits = logits[order]
        total = logits if total is None else total + logits
    return total / len(flips)


# ----------------------------------------------------------------------------- back to the grid


def resample_probabilities(probabilities: torch.Tensor, source_ras_affine: np.ndarray, target: Grid,
                           slab_voxels: int = 1 << 20, keep: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Trilinear probabilities on `target`'s voxels, then argmax, a slab of k-slices at a time.

    The model grid is the scan's grid reoriented (axes permuted and flipped) and rescaled, so a target
    axis runs along one model axis and trilinear interpolation splits into three 1D passes (exactly
    `grid_sample`'s trilinear, border padding, aligned corners), ~10x cheaper on a 512x512 CT. Any
    other mapping takes the general `grid_sample` path.

    Args:
        probabilities: (K, X', Y', Z') on the model grid whose voxel->RAS affine is `source_ras_affine`.
        keep: also return the resampled probabilities as uint8 percent (K, X, Y, Z).
    Returns:
        labels (X, Y, Z) uint8 on `target`, and the probabilities if `keep`.
    """
    mapping = np.linalg.inv(source_ras_affine) @ target.ras_affine  # target voxel -> model voxel
    nx, ny, nz = target.shape
    labels = np.empty(target.shape, np.uint8, order="F")  # SimpleITK's layout: written without a copy
    kept = np.empty((probabilities.shape[0], *target.shape), np.uint8) if keep else None
    axes = _axis_aligned(mapping)
    slabs = _separable_slabs(probabilities, axes, target.shape) if axes else _general_slabs(probabilities, mapping,
                                                                                             target.shape)
    step = max(1, slab_voxels // max(nx * ny, 1))
    for k0 in range(0, nz, step):
        ks = np.arange(k0, min(nz, k0 + step))
        slab = slabs(ks)  # (X, Y, k, K)
        labels[:, :, k0:k0 + len(ks)] = slab.argmax(-1).to(torch.uint8).numpy()
        if keep:
            kept[:, :, :, k0:k0 + len(ks)] = (slab.clamp(0, 1) * 100).round().to(torch.uint8).permute(3, 0, 1, 2).numpy()
    return labels, kept


def _axis_aligned(mapping: np.ndarray) -> list[tuple[int, float, float]] | None:
    """Per target axis (model axis, scale, offset) if the mapping only permutes, flips and scales axes."""
    matrix, axes = mapping[:3, :3], []
    for t in range(3):
        column = np.abs(matrix[:, t])
        s = int(np.argmax(column))
        if np.delete(column, s).max() > 1e-6 * column[s]:
            return None
        axes.append((s, float(matrix[s, t]), float(mapping[s, 3])))
    return axes if len({a[0] for a in axes}) == 3 else None


def _linear_taps(coordinates: np.ndarray, size: int, first: int = 0):
    """Neighbour indices (relative to `first`) and weights of 1D linear interpolation, border-clamped."""
    c = np.clip(coordinates, 0, size - 1)
    low = np.minimum(np.floor(c).astype(np.int64), size - 1)
    high = np.minimum(low + 1, size - 1)
    return torch.from_numpy(low - first), torch.from_numpy(high - first), torch.from_numpy(c - low).float()


def _lerp_axis(volume: torch.Tensor, dim: int, taps) -> torch.Tensor:
    low, high, weight = taps
    shape = [1] * volume.dim()
    shape[dim] = -1
    return torch.lerp(volume.index_select(dim, low), volume.index_select(dim, high), weight.view(shape))


def _separable_slabs(probabilities: torch.Tensor, axes, shape):
    # (X', Y', Z', K), a view: model axes in target order and classes last, so that after the first
    # (small) pass every gather moves whole contiguous rows; a strided gather along an inner axis
    # costs several times more. No copy: the probabilities of a 512x512 CT take ~0.5 GB.
    volume = probabilities.float().permute(*(1 + s for s, _, _ in axes), 0)
    sizes = volume.shape[:3]
    in_plane = [_linear_taps(scale * np.arange(n) + offset, size)
                for (_, scale, offset), n, size in zip(axes[:2], shape[:2], sizes[:2])]
    _, scale_z, offset_z = axes[2]

    def slab(ks: np.ndarray) -> torch.Tensor:
        coordinates = np.clip(scale_z * ks + offset_z, 0, sizes[2] - 1)
        first, last = int(np.floor(coordinates.min())), min(int(np.floor(coordinates.max())) + 1, sizes[2] - 1)
        out = _lerp_axis(volume.narrow(2, first, last - first + 1), 2, _linear_taps(coordinates, sizes[2], first))
        return _lerp_axis(_lerp_axis(out, 0, in_plane[0]), 1, in_plane[1])  # (X, Y, k, K)

    return slab


def _general_slabs(probabilities: torch.Tensor, mapping: np.ndarray, shape):
    volume = probabilities[None].float()  # (1, K, D=X', H=Y', W=Z')
    nx, ny, _ = shape
    ii, jj = torch.meshgrid(torch.arange(nx, dtype=torch.float64), torch.arange(ny, dtype=torch.float64), indexing="ij")
    plane = torch.stack([ii, jj], -1)  # (X, Y, 2)
    matrix, offset = torch.from_numpy(mapping[:3, :3]), torch.from_numpy(mapping[:3, 3])
    scale = torch.from_numpy(2.0 / np.maximum(np.array(probabilities.shape[1:]) - 1, 1))

    def slab(ks: np.ndarray) -> torch.Tensor:
        ks = torch.from_numpy(ks.astype(np.float64))
        index = torch.cat([plane[:, :, None, :].expand(nx, ny, len(ks), 2),
                           ks[None, None, :, None].expand(nx, ny, len(ks), 1)], -1)  # (X, Y, k, 3)
        normalised = ((index @ matrix.T + offset) * scale - 1).flip(-1).to(torch.float32)  # (W, H, D) order
        return torch.nn.functional.grid_sample(volume, normalised[None], mode="bilinear", padding_mode="border",
                                               align_corners=True)[0].permute(1, 2, 3, 0)  # (X, Y, k, K)

    return slab


# ------------------------------------------------------------------------------------ predictor


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over classes (dim 0) in place: a 512x512 CT's logits are ~0.5 GB, a copy as much again."""
    logits.sub_(logits.amax(0, keepdim=True)).exp_()
    return logits.div_(logits.sum(0, keepdim=True))


@dataclass
class Segmentation:
    """A mask on the input's exact grid, with what a report needs about it."""

    labels: np.ndarray  # (X, Y, Z) uint8
    grid: Grid
    organs: dict[int, str]
    probabilities: np.ndarray | None = None  # (K, X, Y, Z) uint8 percent, with keep_probabilities
    seconds: dict[str, float] = field(default_factory=dict)  # per stage

    def volumes(self) -> dict[str, dict[str, float]]:
        from medseg.metrics import voxel_counts

        counts = voxel_counts(self.labels, minlength=max(self.organs) + 1)
        return {name: {"volume_ml": float(counts[i] * self.grid.voxel_volume_ml), "voxels": int(counts[i])}
                for i, name in self.organs.items()}


class Predictor:
    """`Predictor(model_dir).predict(image)`: the Python face of `medseg predict`."""

    def __init__(self, model: str | Path | ModelBundle, device: str = "auto", fast: bool = False,
                 tta: bool | None = None, checkpoint: str = "best", precision: str = "auto"):
        self.bundle = model if isinstance(model, ModelBundle) else load_model(model, device, checkpoint, precision)
        settings = self.bundle.task.inference
        self.overlap = settings.fast_overlap if fast else settings.overlap
        self.tta = settings.tta if tta is None else tta

    @property
    def task(self) -> Task:
        return self.bundle.task

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """(C, X, Y, Z) preprocessed -> (K, X, Y, Z) logits."""
        bundle, settings = self.bundle, self.bundle.task.inference
        window = dict(roi=bundle.plan.patch_size, overlap=self.overlap, sw_batch_size=settings.sw_batch_size,
                      blending=settings.blending, device=bundle.device, precision=bundle.precision)
        flips = [(), (0,), (1,), (2,)] if self.tta else [()]
        return flipped_logits(bundle.network, image, bundle.task.swap_pairs(), flips, **window)

    def predict(self, image: str | Path | Sequence[str | Path] | tuple[np.ndarray, Grid],
                keep_probabilities: bool = False) -> Segmentation:
        """Segment one scan (path(s), DICOM folder, or an (array (C, X, Y, Z), Grid) pair)."""
        from medseg.postprocess import keep_largest_component

        seconds, start = {}, time.perf_counter()
        array, grid = image if isinstance(image, tuple) and isinstance(image[1], Grid) else read_image(image, None)
        if array.ndim == 3:
            array = array[None]
        if array.shape[0] != len(self.task.channels):
            raise InputError(f"model expects {len(self.task.channels)} channel(s) {self.task.channels}, got {array.shape[0]}")
        seconds["read"] = time.perf_counter() - start

        start = time.perf_counter()
        prep = self.bundle.preprocessing
        volume, model = to_model_grid(array, grid, prep.spacing)  # the scan's units (HU), float32
        box = self.body_box(volume[0])
        volume = normalize_(volume[(slice(None), *box)].contiguous(), prep)
        seconds["preprocess"] = time.perf_counter() - start

        start = time.perf_counter()
        probabilities = _softmax_(self.logits(volume))
        del volume
        seconds["inference"] = time.perf_counter() - start

        start = time.perf_counter()
        if not keep_probabilities:  # labels only: interpolate just where an organ can win
            inner = organ_box(probabilities)
            probabilities = probabilities[(slice(None), *inner)]
            box = tuple(slice(b.start + i.start, b.start + i.stop) for b, i in zip(box, inner))
        labels, kept = resample_box(probabilities, box, model, grid, keep_probabilities)
        seconds["resample"] = time.perf_counter() - start

        start = time.perf_counter()
        keep_ids = [self.task.label_id(name) for name in self.task.inference.largest_component]
        labels = keep_largest_component(labels, keep_ids)
        seconds["postprocess"] = time.perf_counter() - start
        return Segmentation(labels, grid, self.task.label_names, kept, seconds)

    def body_box(self, volume: torch.Tensor) -> tuple[slice, slice, slice]:
        """Where the windows go on the model grid: around the body on a CT (`inference.crop_to_body`)."""
        if self.task.modality != "CT" or not self.task.inference.crop_to_body:
            return tuple(slice(0, n) for n in volume.shape)
        return body_box(volume, self.bundle.plan.patch_size)


# ---------------------------------------------------------------------------------- body crop

BODY_HU = -500.0  # air is ~-1000 HU and lung ~-800, fat ~-100: anything denser is patient (or table)


def body_box(hu: torch.Tensor, roi: Sequence[int], threshold: float = BODY_HU, margin: int = 2,
             min_voxels: int = 16) -> tuple[slice, slice, slice]:
    """The bounding box of everything denser than air, plus `margin` voxels, at least a window large.

    Sliding windows over the air around a patient (a third to half of a 512 x 512 CT slice) only
    confirm background; TotalSegmentator and nnU-Net crop them away too. A plane counts as body when
    it holds at least `min_voxels` such voxels, so specks of noise in the air do not stretch the box.

    Args:
        hu: (X, Y, Z) on the model grid, in Hounsfield units.
        roi: the window size; the box is grown (inside the volume) to at least this size.
    """
    dense = hu > threshold
    box = []
    for axis, (size, window) in enumerate(zip(hu.shape, roi)):
        others = tuple(a for a in range(3) if a != axis)
        planes = torch.nonzero(dense.sum(others) >= min_voxels).flatten()
        if len(planes) == 0:
            return tuple(slice(0, n) for n in hu.shape)
        low, high = int(planes[0]) - margin, int(planes[-1]) + 1 + margin
        grow = max(0, min(window, size) - (high - low))
        low, high = low - grow // 2, high + grow - grow // 2
        if low < 0:  # slide back inside the volume, keeping the size
            low, high = 0, high - low
        if high > size:
            low, high = low - (high - size), size
        box.append(slice(max(0, low), high))
    return tuple(box)


def organ_box(probabilities: torch.Tensor) -> tuple[slice, slice, slice]:
    """The box outside which trilinear interpolation cannot give anything but background.

    Interpolated values are convex combinations of 8 neighbours: where all 8 are background with
    p > 0.5, so is the result, and its argmax. The box holds every voxel with background p <= 0.5,
    plus one voxel of the (surely background) voxels around them, so that every target voxel with
    an organ corner is interpolated from the real values. Empty: a one-voxel box at the corner.

    Args:
        probabilities: (K, X, Y, Z) softmax, class 0 background.
    """
    contested = probabilities[0] <= 0.5
    box = []
    for axis, size in enumerate(contested.shape):
        others = tuple(a for a in range(3) if a != axis)
        hit = torch.nonzero(contested.any(dim=others[1]).any(dim=others[0])).flatten()
        if len(hit) == 0:
            return (slice(0, 1),) * 3
        box.append(slice(max(0, int(hit[0]) - 1), min(size, int(hit[-1]) + 2)))
    return tuple(box)


def resample_box(probabilities: torch.Tensor, box: tuple[slice, slice, slice], model: Grid, target: Grid,
                 keep: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """`resample_probabilities` for probabilities computed on `box` of the model grid only.

    Outside the box is background. The box's probabilities get a one-voxel rim, background where the
    box ends inside the volume and the edge values where the volume itself ends (the border clamping
    of the uncropped way), and only the target voxels near the box are interpolated.
    """
    full = all(s.start == 0 and s.stop == n for s, n in zip(box, model.shape))
    if full:
        return resample_probabilities(probabilities, model.ras_affine, target, keep=keep)
    rim = F.pad(probabilities[None], (1, 1, 1, 1, 1, 1), mode="replicate")[0]
    for axis, (s, n) in enumerate(zip(box, model.shape)):
        for index, inside in ((0, s.start > 0), (-1, s.stop < n)):
            if inside:
                face = rim.select(axis + 1, index)
                face.zero_()
                face[0] = 1.0
    shift = np.eye(4)
    shift[:3, 3] = [s.start - 1 for s in box]
    source = model.ras_affine @ shift  # rim voxel -> RAS
    # The target voxels the rim's corners reach, one voxel wider; every other voxel is background.
    corners = np.stack(np.meshgrid(*[[0, n - 1] for n in rim.shape[1:]], indexing="ij"), -1).reshape(-1, 3)
    reached = (np.linalg.inv(target.ras_affine) @ source @ np.c_[corners, np.ones(8)].T)[:3].T
    low = np.clip(np.floor(reached.min(0)).astype(int) - 1, 0, target.shape)
    high = np.clip(np.ceil(reached.max(0)).astype(int) + 2, 0, target.shape)
    labels = np.zeros(target.shape, np.uint8, order="F")  # SimpleITK's layout: written without a copy
    kept = None
    if keep:
        kept = np.zeros((probabilities.shape[0], *target.shape), np.uint8)
        kept[0] = 100
    if np.any(high <= low):
        return labels, kept
    part = (slice(low[0], high[0]), slice(low[1], high[1]), slice(low[2], high[2]))
    origin = target.affine @ np.r_[low, 1.0]
    sub = Grid(tuple(int(n) for n in high - low), target.spacing, tuple(origin[:3].tolist()), target.direction)
    labels[part], sub_kept = resample_probabilities(rim, source, sub, keep=keep)
    if keep:
        kept[(slice(None), *part)] = sub_kept
    return labels, kept
