"""Partial labels: which organs each case contoured, carried with the case from disk to the loss.

A dataset entry may list the organs that were drawn (`"contoured"`, MSD layout). An organ missing
there is *unlabelled* in that case, not absent: its voxels read 0 but may well hold the organ. Such a
case is turned into a boolean channel mask (channel 0, background, always on) that travels on the
TorchIO subject under `CONTOURED`; TorchIO copies it into every patch and the DataLoader stacks it
to (B, C), so the loss (`medseg.losses`) can leave each case's uncontoured organs out, and
validation and evaluation can skip them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torchio as tio

from medseg.config import Task

CONTOURED = "contoured"  # subject key of the (C,) bool mask; a batch holds it as (B, C)


def contoured_mask(contoured: Sequence[str] | None, task: Task) -> torch.Tensor:
    """The network channels a case has labels for.

    Args:
        contoured: organ names drawn in the case; None: every organ (a fully labelled case).
        task: gives the organ of each channel.

    Returns:
        (C,) bool, C = `task.num_classes`: True for background and each contoured organ. Channels of no
        organ (gaps in the label ids) stay True, as in a fully labelled case.

    Raises:
        ValueError: `contoured` names an organ the task does not have.
    """
    mask = torch.ones(task.num_classes, dtype=torch.bool)
    if contoured is None:
        return mask
    unknown = sorted(set(contoured) - set(task.label_names.values()))
    if unknown:
        raise ValueError(f"contoured organs {unknown} are not organs of task '{task.name}' "
                         f"({', '.join(task.label_names.values())})")
    for label in task.labels:
        mask[label.id] = label.name in contoured
    return mask


def set_contoured(subject: tio.Subject, mask: torch.Tensor) -> tio.Subject:
    """Put `mask` on `subject` in place so that it reaches the patches, and return the subject.

    TorchIO's patch sampler (`Crop`) copies a subject's attributes, not its dict items, so a key set
    with `subject[key] = ...` alone would silently vanish from every patch.
    """
    subject[CONTOURED] = mask
    subject.update_attributes()
    return subject


def uncontoured_organs(contoured: Sequence[str] | None, organs: Mapping[int, str]) -> set[str]:
    """Organ names a case did not contour (empty for a fully labelled case)."""
    if contoured is None:
        return set()
    return {name for name in organs.values() if name not in contoured}


def case_weights(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """How often to draw each case so that rarely contoured organs are seen often enough to be learnt.

    A case weighs N / n for the least-contoured organ it has, N cases in all and n of them contouring
    that organ: a case that is the only one drawing an organ is drawn as often as that organ needs,
    while the fully labelled datasets get equal weights.

    Args:
        masks: each case's (C,) bool mask from `contoured_mask`.

    Returns:
        (N,) float weights, 1.0 for a case whose organs every case contoured.
    """
    stacked = torch.stack(list(masks)).float()
    cases_per_channel = stacked.sum(0).clamp(min=1)
    rarity = stacked * (len(stacked) / cases_per_channel)
    return rarity.amax(dim=1).clamp(min=1.0)
