"""Partial labels: the contoured mask of a case, swapped by a left-right flip, through the patch queue."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchio as tio
import yaml
from conftest import TINY_TASK

from medseg.config import Augmentation, FlipAug, Sampling, parse_task
from medseg.data.augment import flip_left_right
from medseg.data.partial import (
    CONTOURED,
    case_weights,
    contoured_mask,
    uncontoured_organs,
)
from medseg.data.patches import patch_batches

TASK = parse_task(yaml.safe_load(TINY_TASK), "tiny.yaml")  # 1 prostate .. 4 femoral_head_left, 5 right


def test_mask_marks_background_and_contoured_organs():
    mask = contoured_mask(["bladder", "femoral_head_left"], TASK)
    assert mask.tolist() == [True, False, True, False, True, False]
    assert contoured_mask(None, TASK).all() and contoured_mask(None, TASK).shape == (6,)
    assert uncontoured_organs(["bladder"], TASK.label_names) == {"prostate", "rectum", "femoral_head_left",
                                                                 "femoral_head_right"}
    assert uncontoured_organs(None, TASK.label_names) == set()


def test_unknown_organ_is_refused():
    with pytest.raises(ValueError, match=r"contoured organs \['liver'\] are not organs of task 'tiny'"):
        contoured_mask(["bladder", "liver"], TASK)


def subject(contoured: list[str], name: str = "case") -> tio.Subject:
    label = torch.zeros(1, 24, 24, 24, dtype=torch.uint8)
    label[0, 2:8, 8:16, 8:16] = 4  # only the left femoral head is drawn
    label[0, 10:14, 10:14, 10:14] = 2
    return tio.Subject(image=tio.ScalarImage(tensor=torch.rand(1, 24, 24, 24)), label=tio.LabelMap(tensor=label),
                       name=name, **{CONTOURED: contoured_mask(contoured, TASK)})


def test_left_right_flip_swaps_the_mask_with_the_labels():
    flipped = flip_left_right(TASK.mirrored_order())(subject(["bladder", "femoral_head_left"]))
    assert (flipped["label"].data == 5).any() and not (flipped["label"].data == 4).any()
    assert flipped[CONTOURED].tolist() == [True, False, True, False, False, True]


def test_mask_survives_the_queue_and_collates_per_case():
    task = dataclasses.replace(TASK, augmentation=Augmentation(flip=FlipAug(p=1.0)))
    subjects = [subject(["bladder", "femoral_head_left"])]
    batch = next(patch_batches(subjects, task, torch.device("cpu")))
    assert batch[CONTOURED].shape == (task.schedule.batch_size, 6)
    for mask in batch[CONTOURED]:  # every patch was flipped: right head contoured, left not
        assert mask.tolist() == [True, False, True, False, False, True]


def test_batches_are_plain_tensors_that_a_cuda_loader_can_pin():
    """The CUDA loader pins (and first `copy.copy`s) every batch; TorchIO Images do not survive that."""
    import copy

    batch = next(patch_batches([subject(["bladder"]), subject(["rectum"])], TASK, torch.device("cpu")))
    size = TASK.schedule.batch_size
    assert set(batch) == {"image", "label", "name", CONTOURED}
    assert batch["image"].shape == (size, 1, *TASK.patch_size) and batch["label"].shape == (size, 1, *TASK.patch_size)
    assert batch[CONTOURED].shape == (size, 6) and len(batch["name"]) == size
    assert all(type(value) is torch.Tensor for key, value in batch.items() if key != "name")
    assert torch.equal(copy.copy(batch)["label"], batch["label"])


def test_case_weights_follow_the_least_contoured_organ():
    everything = contoured_mask(None, TASK)
    no_prostate = contoured_mask(["bladder", "rectum", "femoral_head_left", "femoral_head_right"], TASK)
    weights = case_weights([everything, no_prostate, no_prostate, no_prostate])
    # prostate is drawn in 1 of 4 cases, every other organ in all 4
    assert weights.tolist() == [4.0, 1.0, 1.0, 1.0]
    assert case_weights([everything, everything]).tolist() == [1.0, 1.0]


def test_balanced_sampling_draws_the_rare_case_more_often():
    common = [subject(["bladder", "femoral_head_left"]) for _ in range(5)]
    rare = subject(["prostate", "bladder", "femoral_head_left"], name="rare")
    task = dataclasses.replace(TASK, sampling=Sampling(samples_per_volume=1, queue_length=2,
                                                       balance_contoured=True))
    torch.manual_seed(0)
    batches = patch_batches(common + [rare], task, torch.device("cpu"))
    names = [name for _ in range(60) for name in next(batches)["name"]]
    # weights 6 for the rare case, 1 for each common one: half the draws, against 1/6 uniformly
    assert 0.35 < names.count("rare") / len(names) < 0.65
