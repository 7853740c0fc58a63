"""Fold ensembles: `medseg predict -m CV_FOLDER` averages the folds' class probabilities.

A cross-validation folder (`medseg train --fold all`, `medseg.train.crossval`) holds one model folder
per fold (`fold_0`, `fold_1`, ...). The scan is resampled to the model grid once (the first fold's
spacing: folds of a task share it unless the task's spacing is `auto`) and cropped to one body box;
every fold then runs the same windows over it, after normalising it with its own training
statistics. The folds' softmax probabilities, and those of any test-time flips, are summed as they
come (`medseg.infer.uncertainty.Accumulator`): memory for one sum, not one copy per fold. The mean
goes back to the scan's exact grid as a single model's does. Largest-component post-processing
follows the folder's `postprocessing.json`, chosen from the out-of-fold predictions, instead of the
task file's `inference.largest_component`; `postprocessing` says which was used.

A single model folder takes the same road when uncertainty is asked for (`--uncertainty`): its
members are then its test-time flips, or the model alone; either way its mask is the plain
`Predictor`'s, which also averages the flips' probabilities (`medseg.infer.tta`).

Any model folders of one task make an ensemble (`EnsemblePredictor([a, b, c])`, e.g. models trained
elsewhere): they must share organs, channels and the model grid's spacing (the scan is resampled
once); networks and patch sizes may differ.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medseg.config import Task
from medseg.data.preprocess import normalize_, to_model_grid
from medseg.errors import InputError
from medseg.infer.predictor import Predictor, Segmentation, load_model
from medseg.infer.resample import to_scan
from medseg.infer.tta import flipped_logits, flips_for, softmax_
from medseg.infer.uncertainty import Accumulator, to_scan_grid
from medseg.io import Grid, read_image
from medseg.model.folder import CONFIG_NAME, read_folder_json

POSTPROCESSING_NAME = "postprocessing.json"  # in a cross-validation folder: organs kept to their largest piece
CROSSVAL_NAME = "crossval.json"  # in a cross-validation folder from `--fold all`: its number of folds, seed, task
TASK_FILE_SOURCE = "task file (inference.largest_component)"


def fold_folders(folder: str | Path) -> list[Path]:
    """The fold model folders (`fold_<k>` with a config.json) of a cross-validation folder, by fold number."""
    found = []
    for path in Path(folder).glob("fold_*"):
        number = path.name[len("fold_"):]
        if number.isdigit() and (path / CONFIG_NAME).is_file():
            found.append((int(number), path))
    return [path for _, path in sorted(found)]


def is_cv_folder(folder: str | Path) -> bool:
    """A cross-validation folder: fold model folders inside, no config.json of its own."""
    return not (Path(folder) / CONFIG_NAME).is_file() and bool(fold_folders(folder))


def model_folders(folder: str | Path) -> list[Path]:
    """The model folders behind `-m FOLDER`: the folds of a cross-validation folder, or the folder itself."""
    return fold_folders(folder) if is_cv_folder(folder) else [Path(folder)]


def trained_folds(folder: str | Path) -> list[Path]:
    """The folds of a cross-validation folder if every one has a best.pt (as many as its crossval.json
    says, else those there are); [] for a folder still training or not a cross-validation folder."""
    if not is_cv_folder(folder):
        return []
    folds = fold_folders(folder)
    try:
        wanted = json.loads((Path(folder) / CROSSVAL_NAME).read_text()).get("folds", len(folds))
    except (OSError, ValueError, AttributeError):
        wanted = len(folds)
    done = len(folds) == wanted and all((f / "best.pt").is_file() for f in folds)
    return folds if done else []


def read_postprocessing(folder: str | Path) -> tuple[tuple[str, ...], str] | None:
    """The organs a cross-validation folder keeps to their largest piece, and where that came from; None
    when the folder has no postprocessing.json (cross-validation not summarised yet)."""
    path = Path(folder) / POSTPROCESSING_NAME
    if not path.is_file():
        return None
    raw = read_folder_json(path)
    organs = raw.get("largest_component") if isinstance(raw, dict) else None
    if not isinstance(organs, list) or not all(isinstance(o, str) for o in organs):
        raise InputError(f"{path}: 'largest_component' must be a list of organ names")
    return tuple(organs), f"{path.name} in the cross-validation folder (chosen from out-of-fold predictions)"


class EnsemblePredictor:
    """Several model folders (the folds of a cross-validation, or any models of one task) as one predictor;
    see the module's notes.

    Args:
        folders: model folders of one task (organs, channels) and one model spacing.
        uncertainty: also compute the per-voxel maps (`Segmentation.uncertainty`, `.disagreement`).
        largest_component: organs reduced to their largest piece; None: the task file's.
        source: where `largest_component` came from, for the summary.
    """

    def __init__(self, folders: Sequence[str | Path], device: str = "auto", fast: bool = False,
                 tta: bool | None = None, precision: str = "auto", uncertainty: bool = False,
                 largest_component: Sequence[str] | None = None, source: str = TASK_FILE_SOURCE,
                 backend: str = "auto"):
        if not folders:
            raise InputError("no model folder to predict with")
        self.folders = [Path(f) for f in folders]
        self.members = [Predictor(load_model(f, device, "best", precision, backend), fast=fast, tta=tta)
                        for f in self.folders]
        self._check_members()
        organs = tuple(self.task.inference.largest_component if largest_component is None else largest_component)
        for organ in organs:
            self.task.label_id(organ)  # a ConfigError naming the organ if the task has none of that name
        self.postprocessing = {"largest_component": list(organs),
                               "source": TASK_FILE_SOURCE if largest_component is None else source}
        self.uncertainty = uncertainty

    @property
    def task(self) -> Task:
        return self.members[0].task

    def _check_members(self) -> None:
        """One task's organs and channels, one model grid; networks and patch sizes may differ."""
        first = self.members[0]
        for folder, member in zip(self.folders[1:], self.members[1:]):
            if member.task.label_names != first.task.label_names or member.task.channels != first.task.channels:
                raise InputError(f"{folder}: its organs or channels differ from {self.folders[0]}'s; an ensemble "
                                 f"needs models of one task")
            spacing, wanted = member.bundle.preprocessing.spacing, first.bundle.preprocessing.spacing
            if not np.allclose(spacing, wanted, rtol=1e-4):
                raise InputError(f"{folder}: its model spacing {_mm(spacing)} differs from {self.folders[0]}'s "
                                 f"{_mm(wanted)}; an ensemble runs every model on one resampled scan")

    def _read(self, image) -> tuple[np.ndarray, Grid]:
        in_memory = isinstance(image, tuple) and len(image) == 2 and isinstance(image[1], Grid)
        array, grid = image if in_memory else read_image(image, dtype=None, dimensions=self.task.dimensions)
        if array.ndim == 3:
            array = array[None]
        if array.shape[0] != len(self.task.channels):
            raise InputError(f"model expects {len(self.task.channels)} channel(s) {self.task.channels}, "
                             f"got {array.shape[0]}")
        return array, grid

    def _average(self, hu: torch.Tensor) -> Accumulator:
        """Every member's softmax on the same windows of `hu` ((C, X, Y, Z), the scan's units), summed."""
        accumulator = Accumulator(with_entropy=self.uncertainty, organs=self.task.label_names)
        for index, member in enumerate(self.members):
            bundle, settings = member.bundle, member.task.inference
            last = index == len(self.members) - 1
            volume = normalize_(hu if last else hu.clone(), bundle.preprocessing)
            window = {"roi": bundle.plan.patch_size, "overlap": member.overlap, "sw_batch_size": settings.sw_batch_size,
                      "blending": settings.blending, "device": bundle.device, "precision": bundle.precision}
            for axes in flips_for(volume.shape[1:], member.tta, member.task.flip_axes()):
                logits = flipped_logits(bundle.network, volume, member.task.mirrored_order(), [axes], **window)
                accumulator.add(softmax_(logits))
            del volume
        return accumulator

    def predict(self, image, keep_probabilities: bool = False) -> Segmentation:
        """Segment one scan (path(s), DICOM folder, or an (array (C, X, Y, Z), Grid) pair) with every member."""
        seconds, start = {}, time.perf_counter()
        array, grid = self._read(image)
        seconds["read"] = time.perf_counter() - start

        start = time.perf_counter()
        first = self.members[0]
        hu, model = to_model_grid(array, grid, first.bundle.preprocessing.spacing)
        widest = [max(sizes) for sizes in zip(*(m.bundle.plan.patch_size for m in self.members))]
        box = first.body_box(hu[0], roi=widest)
        hu = hu[(slice(None), *box)].contiguous()
        seconds["preprocess"] = time.perf_counter() - start

        start = time.perf_counter()
        accumulator = self._average(hu)
        del hu
        mean = accumulator.mean_()
        seconds["inference"] = time.perf_counter() - start

        start = time.perf_counter()
        maps = accumulator.maps(mean) if self.uncertainty else (None, None)
        confidence = accumulator.confidence(mean, maps[0])
        uncertainty, disagreement = (None if m is None else to_scan_grid(m, box, model, grid) for m in maps)
        if self.uncertainty:
            seconds["uncertainty"] = time.perf_counter() - start

        start = time.perf_counter()
        labels, kept = to_scan(mean, box, model, grid, keep_probabilities)
        del mean, accumulator
        seconds["resample"] = time.perf_counter() - start

        start = time.perf_counter()
        labels, pieces = self.postprocess(labels)
        seconds["postprocess"] = time.perf_counter() - start
        return Segmentation(labels, grid, self.task.label_names, kept, seconds, uncertainty=uncertainty,
                            disagreement=disagreement, confidence=confidence, pieces=pieces)

    def postprocess(self, labels: np.ndarray) -> tuple[np.ndarray, dict[str, list[int]]]:
        """The chosen organs kept to their largest piece (in place); and their pieces before, in voxels."""
        from medseg.infer.postprocess import keep_largest_component

        found: dict[int, np.ndarray] = {}
        ids = [self.task.label_id(organ) for organ in self.postprocessing["largest_component"]]
        labels = keep_largest_component(labels, ids, in_place=True, pieces=found)
        return labels, {self.task.label_names[i]: sizes.tolist() for i, sizes in found.items()}


def _mm(spacing: Sequence[float]) -> str:
    return "x".join(f"{v:g}" for v in spacing) + " mm"


def make_predictor(model: str | Path, device: str = "auto", fast: bool = False, tta: bool | None = None,
                   precision: str = "auto", uncertainty: bool = False,
                   backend: str = "auto") -> Predictor | EnsemblePredictor:
    """What `medseg predict -m MODEL` runs: a `Predictor` for one model folder, an `EnsemblePredictor` for a
    cross-validation folder (with its chosen post-processing) or when uncertainty is asked for."""
    cv = is_cv_folder(model)
    if not cv and not uncertainty:
        return Predictor(model, device=device, fast=fast, tta=tta, precision=precision, backend=backend)
    chosen = read_postprocessing(model) if cv else None
    organs, source = chosen if chosen else (None, TASK_FILE_SOURCE)
    return EnsemblePredictor(model_folders(model), device, fast, tta, precision, uncertainty, organs, source,
                             backend)


def postprocessing_of(predictor: Predictor | EnsemblePredictor) -> dict:
    """The organs a predictor keeps to their largest piece, and the source of that choice."""
    if isinstance(predictor, EnsemblePredictor):
        return predictor.postprocessing
    return {"largest_component": list(predictor.task.inference.largest_component), "source": TASK_FILE_SOURCE}
