"""`Predictor`, the Python face of `medseg predict`: a model folder loaded, one scan in, a mask on its grid out.

The network sees the scan preprocessed (RAS, model spacing, normalised; on CT only the body's box) in
overlapping windows (`medseg.infer.stitching`, flipped copies with `medseg.infer.tta`);
`medseg.infer.resample` carries its class probabilities back to the scan's own grid.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from medseg.config import Task
from medseg.data.preprocess import Preprocessing, normalize_, to_model_grid
from medseg.errors import InputError
from medseg.geometry import body_box
from medseg.infer.backends import INT8, backend_network
from medseg.infer.resample import to_scan
from medseg.infer.tta import flipped_logits, flipped_probabilities, flips_for
from medseg.infer.uncertainty import CONFIDENCE_SCORE
from medseg.io import Grid, read_image
from medseg.planar import is_planar
from medseg.model.folder import load_checkpoint, read_run_config
from medseg.model.networks import NetworkPlan, build_network
from medseg.runtime import resolve_device, resolve_precision

# ---------------------------------------------------------------------------------- model folder


@dataclass
class ModelBundle:
    """A trained model folder, loaded: everything prediction needs and nothing else."""

    folder: Path
    task: Task
    preprocessing: Preprocessing
    plan: NetworkPlan
    network: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor]  # windows (B, C, x, y, z) -> logits
    device: torch.device
    precision: str = "auto"  # torch's side: 'bf16' or 'fp32' once loaded (int8: 'fp32'; medseg.runtime)
    backend: str = "torch"  # what runs `network`: 'torch' or 'openvino' (medseg.infer.backends)


def load_model(folder: str | Path, device: str = "auto", checkpoint: str = "best",
               precision: str = "auto", backend: str = "auto") -> ModelBundle:
    """Rebuild the network from the folder's config.json and load `best.pt` (or `last.pt`).

    The network is laid out for `device` and `precision` ('auto', 'bf16', 'fp32') by
    `medseg.runtime.prepare_network`, or compiled by OpenVINO (`backend`: 'auto', 'torch', 'openvino';
    `medseg.infer.backends.backend_network`). `precision` 'int8' takes the folder's int8 OpenVINO network,
    only where `medseg quantize` checked it and it passed (`medseg.infer.int8.int8_network`); 'auto'
    takes it too on a CPU without bf16 units (`medseg.infer.int8.auto_takes_int8`).
    """
    folder = Path(folder)
    config = read_run_config(folder)
    weights = checkpoint_file(folder, checkpoint)
    torch_device = resolve_device(device)
    window = (config.network.in_channels, *config.network.patch_size)
    checked = None  # the int8 network `auto` takes, checked once (medseg.infer.int8)
    if precision == "auto" and torch_device.type == "cpu":
        from medseg.infer.int8 import auto_takes_int8

        checked = auto_takes_int8(weights, window, backend, torch_device)
    if precision == INT8 or checked:  # the checked int8 OpenVINO network; torch's side of the windows stays fp32
        from medseg.infer.int8 import compiled_int8, int8_network

        network = compiled_int8(checked) if checked else int8_network(weights, window, backend, torch_device)
        return ModelBundle(folder, config.task, config.preprocessing, config.network, network, torch_device, "fp32",
                           "openvino")
    network = build_network(config.network)
    network.load_state_dict(load_checkpoint(weights)["model"])
    precision = resolve_precision(precision, torch_device)
    network, backend = backend_network(network, backend, torch_device, precision, weights, window,
                                       config.task.inference.sw_batch_size)
    return ModelBundle(folder, config.task, config.preprocessing, config.network, network, torch_device, precision,
                       backend)


def checkpoint_file(folder: Path, checkpoint: str = "best") -> Path:
    """`<folder>/<checkpoint>.pt`, else last.pt: the weights `load_model` takes."""
    weights = folder / f"{checkpoint}.pt"
    if not weights.is_file():
        weights = folder / "last.pt"
    if not weights.is_file():
        raise InputError(f"{folder}: no best.pt or last.pt checkpoint (training has not saved one yet)")
    return weights

# ------------------------------------------------------------------------------------ predictor


@dataclass
class Segmentation:
    """A mask on the input's exact grid, with what a report needs about it."""

    labels: np.ndarray  # (X, Y, Z) uint8
    grid: Grid
    organs: dict[int, str]
    probabilities: np.ndarray | None = None  # (K, X, Y, Z) uint8 percent, with keep_probabilities
    seconds: dict[str, float] = field(default_factory=dict)  # per stage
    # from an ensemble or with --uncertainty (medseg.infer.uncertainty): (X, Y, Z) float32 maps on the grid
    uncertainty: np.ndarray | None = None  # normalised predictive entropy
    disagreement: np.ndarray | None = None  # mutual information of the members (folds, flips); None for one
    confidence: dict[str, dict] = field(default_factory=dict)  # organ -> scores (uncertainty.organ_confidence)
    pieces: dict[str, list[int]] = field(default_factory=dict)  # organ -> piece voxels before the largest-piece step
    flags: list[dict] = field(default_factory=list)  # QA flags (medseg.infer.qa), worst first

    @cached_property
    def extent(self) -> tuple[slice, slice, slice] | None:
        """The box that holds every organ voxel (None: no organ): counting and drawing need only that.

        Found on first use and kept: change `labels` in place after that and it is stale.
        """
        from medseg.geometry import nonzero_box

        return nonzero_box(self.labels)

    def volumes(self) -> dict[str, dict[str, float]]:
        from medseg.geometry import voxel_counts

        inside = self.labels[self.extent] if self.extent else self.labels[:0]
        counts = voxel_counts(inside, minlength=max(self.organs) + 1)
        volumes = {name: {"volume_ml": float(counts[i] * self.grid.voxel_volume_ml), "voxels": int(counts[i])}
                   for i, name in self.organs.items()}
        if is_planar(self.grid.shape):  # a 2D image: its areas (volume_ml stays, as if 1 mm thick)
            pixel_mm2 = self.grid.spacing[0] * self.grid.spacing[1]
            for entry in volumes.values():
                entry["area_mm2"] = entry["voxels"] * pixel_mm2
        for name, scores in self.confidence.items():  # with an ensemble or --uncertainty
            volumes[name]["confidence"] = scores.get(CONFIDENCE_SCORE)
            if "estimated_dice" in scores:  # the model's calibration fitted it (medseg.infer.calibration)
                volumes[name]["estimated_dice"] = scores["estimated_dice"]
        return volumes


class Predictor:
    """`Predictor(model_dir).predict(image)`: the Python face of `medseg predict`."""

    def __init__(self, model: str | Path | ModelBundle, device: str = "auto", fast: bool = False,
                 tta: bool | None = None, checkpoint: str = "best", precision: str = "auto", backend: str = "auto"):
        self.bundle = (model if isinstance(model, ModelBundle)
                       else load_model(model, device, checkpoint, precision, backend))
        settings = self.bundle.task.inference
        self.overlap = settings.fast_overlap if fast else settings.overlap
        self.tta = settings.tta if tta is None else tta

    @property
    def task(self) -> Task:
        return self.bundle.task

    def _window(self) -> dict:
        bundle, settings = self.bundle, self.bundle.task.inference
        return {"roi": bundle.plan.patch_size, "overlap": self.overlap, "sw_batch_size": settings.sw_batch_size,
                "blending": settings.blending, "device": bundle.device, "precision": bundle.precision}

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """(C, X, Y, Z) preprocessed -> (K, X, Y, Z) logits (with test-time flips: their mean)."""
        flips = flips_for(image.shape[1:], self.tta, self.task.flip_axes())
        return flipped_logits(self.bundle.network, image, self.task.mirrored_order(), flips, **self._window())

    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """(C, X, Y, Z) preprocessed -> (K, X, Y, Z) class probabilities (with test-time flips: the mean of
        each flip's softmax, as an ensemble averages its members)."""
        flips = flips_for(image.shape[1:], self.tta, self.task.flip_axes())
        return flipped_probabilities(self.bundle.network, image, self.task.mirrored_order(), flips, **self._window())

    def predict(self, image: str | Path | Sequence[str | Path] | tuple[np.ndarray, Grid],
                keep_probabilities: bool = False) -> Segmentation:
        """Segment one scan (path(s), DICOM folder, or an (array (C, X, Y, Z), Grid) pair)."""
        from medseg.infer.postprocess import keep_largest_component

        seconds, start = {}, time.perf_counter()
        array, grid = self.read(image)
        seconds["read"] = time.perf_counter() - start

        start = time.perf_counter()
        volume, box, model = self.preprocess(array, grid)
        seconds["preprocess"] = time.perf_counter() - start

        start = time.perf_counter()
        probabilities = self.probabilities(volume)
        del volume
        seconds["inference"] = time.perf_counter() - start

        start = time.perf_counter()
        labels, kept = to_scan(probabilities, box, model, grid, keep_probabilities)
        del probabilities  # ~0.2 GB for a 512x512x300 CT: not held through the largest-component step
        seconds["resample"] = time.perf_counter() - start

        start = time.perf_counter()
        keep_ids = [self.task.label_id(name) for name in self.task.inference.largest_component]
        pieces: dict[int, np.ndarray] = {}
        labels = keep_largest_component(labels, keep_ids, in_place=True, pieces=pieces)  # ours: no copy
        seconds["postprocess"] = time.perf_counter() - start
        return Segmentation(labels, grid, self.task.label_names, kept, seconds,
                            pieces={self.task.label_names[i]: sizes.tolist() for i, sizes in pieces.items()})

    def read(self, image: str | Path | Sequence[str | Path] | tuple[np.ndarray, Grid]) -> tuple[np.ndarray, Grid]:
        """The scan as (C, X, Y, Z) voxels and its grid; its channels checked against the model's."""
        in_memory = isinstance(image, tuple) and isinstance(image[1], Grid)
        array, grid = image if in_memory else read_image(image, dtype=None, dimensions=self.task.dimensions)
        if array.ndim == 3:
            array = array[None]
        if array.shape[0] != len(self.task.channels):
            raise InputError(f"model expects {len(self.task.channels)} channel(s) {self.task.channels}, got {array.shape[0]}")
        return array, grid

    def preprocess(self, array: np.ndarray, grid: Grid) -> tuple[torch.Tensor, tuple[slice, ...], Grid]:
        """(C, X, Y, Z) scan -> what the windows go over: (C, x, y, z) float32 on the model grid, normalised,
        inside the body's box; that box and the model grid (for the way back, `medseg.infer.resample`)."""
        prep = self.bundle.preprocessing
        volume, model = to_model_grid(array, grid, prep.spacing)  # the scan's units (HU), float32
        box = self.body_box(volume[0])
        return normalize_(volume[(slice(None), *box)].contiguous(), prep), box, model

    def body_box(self, volume: torch.Tensor, roi: Sequence[int] | None = None) -> tuple[slice, slice, slice]:
        """Where the windows go on the model grid: around the body on a CT (`inference.crop_to_body`), at
        least a window (`roi`; default this model's patch) large."""
        if self.task.modality != "CT" or not self.task.inference.crop_to_body:
            return tuple(slice(0, n) for n in volume.shape)
        return body_box(volume, roi or self.bundle.plan.patch_size)
