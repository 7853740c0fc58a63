"""Augmentation: a left-right flip keeps the left femoral head labelled left, in world coordinates."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torchio as tio
from conftest import blob_case, make_grid

from medseg.config import AffineAug, Augmentation, BlurAug, ElasticAug, FlipAug, load_task
from medseg.data.augment import build_augmentation, flip_left_right
from medseg.data.preprocess import ChannelIntensity, Preprocessing, preprocess

LEFT, RIGHT = 4, 5


def world_centroid(subject: tio.Subject, label_id: int) -> np.ndarray:
    """Centroid of an organ in RAS world mm (the subject's own affine, whatever its voxel order)."""
    index = np.argwhere(subject["label"].data[0].numpy() == label_id).mean(0)
    return subject["label"].affine[:3, :3] @ index + subject["label"].affine[:3, 3]


@pytest.fixture(params=["LPS", "RAS", "PLI"])
def ras_subject(request) -> tio.Subject:
    grid = make_grid(request.param, shape=(40, 36, 24))
    image, labels = blob_case(grid)
    prep = Preprocessing((2.0, 2.0, 2.0), "none", (ChannelIntensity(None, 0.0, 1.0),))
    return preprocess(prep, image[None].astype(np.float32), grid, labels)


def test_left_head_is_on_the_patients_left(ras_subject):
    # RAS world: smaller x is further to the patient's left
    assert world_centroid(ras_subject, LEFT)[0] < world_centroid(ras_subject, RIGHT)[0]


def test_flip_swaps_paired_labels_and_keeps_left_on_the_left(ras_subject):
    task = load_task("prostate")
    flipped = flip_left_right(task.mirrored_order())(ras_subject)
    assert world_centroid(flipped, LEFT)[0] < world_centroid(flipped, RIGHT)[0]
    # the image really was mirrored: the voxels now called left held the right head's intensities
    before = ras_subject["label"].data[0].numpy()
    after = flipped["label"].data[0].numpy()
    assert np.array_equal(after == LEFT, np.flip(before == RIGHT, 0))
    assert torch.equal(flipped["image"].data, ras_subject["image"].data.flip(1))


def test_flip_twice_is_identity(ras_subject):
    swap = load_task("prostate").mirrored_order()
    twice = flip_left_right(swap)(flip_left_right(swap)(ras_subject))
    assert torch.equal(twice["label"].data, ras_subject["label"].data)
    assert torch.equal(twice["image"].data, ras_subject["image"].data)


def test_task_augmentation_with_certain_flip_keeps_sides(ras_subject):
    task = load_task("prostate")
    task = dataclasses.replace(task, augmentation=Augmentation(flip=FlipAug(p=1.0)))
    augmented = build_augmentation(task)(ras_subject)
    assert torch.equal(augmented["image"].data, ras_subject["image"].data.flip(1))  # it did flip
    assert world_centroid(augmented, LEFT)[0] < world_centroid(augmented, RIGHT)[0]


def test_augmentation_keeps_labels_and_shapes(ras_subject):
    torch.manual_seed(0)
    transform = build_augmentation(load_task("prostate"))
    for _ in range(5):
        out = transform(ras_subject)
        assert out["image"].shape == ras_subject["image"].shape
        assert set(np.unique(out["label"].data.numpy())) <= {0, 1, 2, 3, 4, 5}
        assert torch.isfinite(out["image"].data).all()


def test_2d_augmentation_stays_in_plane():
    """A 2D task's (C, X, Y, 1) patches keep their singleton axis: rotation about it only, scaling, blur and
    elastic shifts in-plane only."""
    augmentation = Augmentation(affine=AffineAug(p=1.0, degrees=30.0), elastic=ElasticAug(p=1.0, max_displacement=2.0),
                                flip=FlipAug(p=1.0, axes=("LR", "AP")), blur=BlurAug(p=1.0))
    task = dataclasses.replace(load_task("prostate"), dimensions=2, patch_size=(32, 32, 1), augmentation=augmentation)
    transform = build_augmentation(task)
    affine = next(t for t in transform.transforms if isinstance(t, tio.RandomAffine))
    assert tuple(affine.degrees[:4]) == (0, 0, 0, 0) and tuple(affine.scales[4:]) == (1, 1)
    labels = torch.zeros(1, 40, 36, 1, dtype=torch.uint8)
    labels[0, 10:30, 8:28] = 2
    subject = tio.Subject(image=tio.ScalarImage(tensor=labels.float() * 100 + torch.randn(1, 40, 36, 1)),
                          label=tio.LabelMap(tensor=labels))
    out = transform(subject)
    assert out["image"].shape == (1, 40, 36, 1) and out["label"].shape == (1, 40, 36, 1)
    assert set(out["label"].data.unique().tolist()) <= {0, 2} and (out["label"].data == 2).sum() > 200
