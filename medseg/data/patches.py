"""Sampling: which cases train and which validate, each case once through preprocessing, then patches.

`make_split` holds out a k-fold share of the cases; `load_subject` reads, checks and preprocesses a
case (cached in the run folder) into a TorchIO subject that carries its contoured-organ mask;
`patch_batches` turns the subjects into an endless stream of augmented, organ-weighted patch batches
(TorchIO Queue + LabelSampler), drawing cases by their rarest contoured organ where the task asks.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torchio as tio

from medseg.data.augment import build_augmentation
from medseg.config import Task
from medseg.data.datasets import Case
from medseg.errors import InputError
from medseg.io import read_image, read_label
from medseg.data.partial import CONTOURED, case_weights, contoured_mask, set_contoured
from medseg.data.preprocess import Preprocessing, pad_to, preprocess
from medseg.model.folder import load_checkpoint, save_checkpoint


def make_split(names: list[str], folds: int, fold: int, seed: int) -> dict[str, list[str]]:
    """K-fold split of case names, shuffled with `seed`; fold `fold` is held out for validation."""
    if fold >= folds:
        raise InputError(f"--fold {fold} is out of range for --folds {folds} (folds are numbered 0..{folds - 1})")
    if len(names) < 2:
        return {"train": list(names), "validation": list(names)}
    order = sorted(names)
    random.Random(seed).shuffle(order)
    folds = min(folds, len(order))
    held_out = sorted(order[fold % folds::folds])
    return {"train": sorted(n for n in order if n not in held_out), "validation": held_out}


def load_subject(case: Case, prep: Preprocessing, task: Task, cache: Path) -> tio.Subject:
    """Read, check and preprocess one case, or take it from the run's cache.

    The subject carries the case's contoured-organ mask under `CONTOURED` (see `medseg.partial`); it
    is not cached, so the dataset's current `contoured` lists always apply.
    """
    path = cache / f"{case.name}.pt"
    if path.is_file():
        saved = load_checkpoint(path)
        affine = saved["affine"].numpy()
        return tio.Subject(image=tio.ScalarImage(tensor=saved["image"], affine=affine),
                           label=tio.LabelMap(tensor=saved["label"], affine=affine), name=case.name,
                           **{CONTOURED: contoured_mask(case.contoured, task)})
    image, grid = read_image(case.images, dimensions=task.dimensions)
    labels, label_grid = read_label(case.label, task.dimensions)
    if not grid.matches(label_grid):
        raise InputError(f"{case.label}: label grid ({label_grid.describe()}) does not match image {case.images[0]} "
                         f"({grid.describe()})")
    unknown = sorted(set(np.unique(labels).tolist()) - {0, *task.label_names} - {task.ignore_label})
    if unknown:
        raise InputError(f"{case.label}: label values {unknown} are not labels of task '{task.name}'")
    subject = pad_to(preprocess(prep, image, grid, labels), task.patch_size)
    save_checkpoint(path, {"image": subject["image"].data.contiguous(), "label": subject["label"].data.contiguous(),
                           "affine": torch.from_numpy(subject["image"].affine)})
    subject["name"] = case.name
    return set_contoured(subject, contoured_mask(case.contoured, task))


def patch_batches(subjects: list[tio.Subject], task: Task, device: torch.device) -> Iterator[dict]:
    """Endless batches of augmented patches: TorchIO Queue + LabelSampler (organ-weighted), as
    `collate_patches` makes them."""
    sampling = task.sampling
    weights = sampling.label_weights or {label.name: 1.0 for label in task.labels}
    total = sum(weights.values())
    probabilities = {0: 1.0 - sampling.foreground_probability}
    for name, weight in weights.items():
        probabilities[task.label_id(name)] = sampling.foreground_probability * weight / total
    draw = case_weights([subject[CONTOURED] for subject in subjects]) if sampling.balance_contoured else None
    while True:
        # one pass over the cases; with balancing, N cases drawn with replacement by their weights
        cases = subjects if draw is None else [subjects[i] for i in torch.multinomial(draw, len(subjects), True)]
        queue = tio.Queue(
            tio.SubjectsDataset(cases, transform=build_augmentation(task)),
            max_length=max(sampling.queue_length, task.schedule.batch_size),
            samples_per_volume=sampling.samples_per_volume,
            sampler=tio.LabelSampler(task.patch_size, "label", probabilities),
            num_workers=sampling.num_workers,
            shuffle_subjects=True,
            shuffle_patches=True,
        )
        yield from torch.utils.data.DataLoader(queue, batch_size=task.schedule.batch_size, num_workers=0,
                                               collate_fn=collate_patches, pin_memory=device.type == "cuda")


def collate_patches(patches: list[tio.Subject]) -> dict:
    """A batch as plain tensors: image and label (B, C, x, y, z), contoured organs (B, K), case names.

    PyTorch's default collate rebuilds TorchIO Images, which the CUDA loader's `pin_memory` then
    copies with `copy.copy`, and a copied Image fails TorchIO's own checks: `medseg train --device
    cuda` stopped at its first batch (seen on an H100). Plain tensors pin, and are all a step uses.
    """
    batch = {"image": torch.stack([patch["image"].data for patch in patches]),
             "label": torch.stack([patch["label"].data for patch in patches]),
             "name": [patch.get("name", "") for patch in patches]}
    if all(CONTOURED in patch for patch in patches):
        batch[CONTOURED] = torch.stack([torch.as_tensor(patch[CONTOURED]) for patch in patches])
    return batch
