"""medseg.geometry: one set of box helpers (find_objects in either memory order, the block of any label, margins, unions) and the body box."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.mark.parametrize("dtype", [np.uint8, np.int16])
def test_voxel_counts_equal_numpy_bincount(dtype):
    from medseg.geometry import voxel_counts

    labels = np.asfortranarray(np.random.default_rng(3).integers(0, 6, size=(17, 13, 9)).astype(dtype))
    counts = voxel_counts(labels, minlength=8)
    assert counts.tolist() == np.bincount(labels.ravel().astype(np.int64), minlength=8).tolist()


def test_label_boxes_are_find_objects_in_either_memory_order():
    from scipy import ndimage

    from medseg.geometry import label_boxes

    labels = np.zeros((20, 15, 9), np.uint8)
    labels[2:5, 3:12, 1:4] = 1
    labels[10:19, 0:2, 5:9] = 3
    expected = ndimage.find_objects(labels)
    assert expected[1] is None
    assert label_boxes(labels) == expected
    assert label_boxes(np.asfortranarray(labels)) == expected
    assert label_boxes(np.asfortranarray(labels), max_label=1) == expected[:1]


@pytest.mark.parametrize("order", ["C", "F"])
def test_label_boxes_of_a_large_mask_match_find_objects(order):
    """Over a million voxels the organs' block is cut out first; the boxes must not move."""
    from scipy import ndimage

    from medseg.geometry import label_boxes

    labels = np.zeros((130, 120, 100), np.uint8, order=order)
    labels[60:90, 1:40, 50:99] = 2
    labels[100:101, 70:71, 3:4] = 5
    labels[0:3, 110:120, 0:2] = 1  # touching the volume's corner
    expected = ndimage.find_objects(np.ascontiguousarray(labels))
    assert label_boxes(labels) == expected
    assert label_boxes(labels, max_label=7) == expected + [None, None]
    assert label_boxes(np.zeros_like(labels), max_label=3) == [None] * 3
    assert label_boxes(np.zeros_like(labels)) == []


@pytest.mark.parametrize("order", ["C", "F"])
def test_nonzero_box_bounds_every_label(order):
    from medseg.geometry import nonzero_box

    labels = np.zeros((30, 20, 10), np.uint8, order=order)
    assert nonzero_box(labels) is None
    labels[4, 7:9, 9] = 2
    labels[11:13, 19, 3] = 1
    assert nonzero_box(labels) == (slice(4, 13), slice(7, 20), slice(3, 10))


def test_body_box_is_the_dense_block_plus_margin():
    from medseg.geometry import body_box

    hu = torch.full((60, 50, 40), -1000.0)
    hu[10:30, 5:45, 12:20] = 40.0  # the body
    hu[55, 2, 38] = 500.0  # a speck of noise in the air
    assert body_box(hu, roi=(8, 8, 4), margin=2) == (slice(8, 32), slice(3, 47), slice(10, 22))


def test_body_box_grows_to_a_window_and_stays_inside():
    from medseg.geometry import body_box

    hu = torch.full((60, 50, 40), -1000.0)
    hu[0:4, 20:26, 36:40] = 40.0
    box = body_box(hu, roi=(16, 16, 16), margin=1)
    assert box == (slice(0, 16), slice(15, 31), slice(24, 40))
    assert body_box(torch.full((20, 20, 20), -1000.0), roi=(8, 8, 8)) == (slice(0, 20),) * 3  # no body: all


def test_grow_clips_to_the_volume_and_takes_one_margin_per_axis():
    from medseg.geometry import grow, grow_mm

    box = (slice(1, 4), slice(5, 9), slice(0, 2))
    assert grow(box, (10, 10, 10), 2) == (slice(0, 6), slice(3, 10), slice(0, 4))
    assert grow(box, (10, 10, 10), (0, 1, 3)) == (slice(1, 4), slice(4, 10), slice(0, 5))
    assert grow_mm(box, (1.0, 2.0, 0.5), (10, 10, 10), 1.5) == (slice(0, 6), slice(4, 10), slice(0, 5))


def test_union_and_organ_boxes_cover_every_map():
    from medseg.geometry import organ_boxes, union

    assert union([]) is None
    assert union([(slice(2, 4), slice(0, 1)), (slice(0, 3), slice(5, 6))]) == (slice(0, 4), slice(0, 6))
    ref = np.zeros((6, 6, 6), np.uint8)
    pred = np.zeros_like(ref)
    ref[1:3, 1:2, 0:2] = 2
    pred[2:5, 0:2, 4:5] = 2
    pred[0, 0, 0] = 1
    assert organ_boxes(ref, pred) == {1: (slice(0, 1),) * 3, 2: (slice(1, 5), slice(0, 2), slice(0, 5))}
    assert organ_boxes(ref > 0) == {1: (slice(1, 3), slice(1, 2), slice(0, 2))}
    assert organ_boxes(np.zeros((0, 3, 3), np.uint8)) == {}


def test_pieces_centres_and_which_pieces_count():
    from medseg.geometry import mask_centre, piece_sizes, significant_pieces

    mask = np.zeros((20, 10, 10), bool)
    mask[1:5, 1:5, 1:5] = True  # 64 voxels
    mask[10:12, 1:3, 1:3] = True  # 8 voxels: 12.5 % of the largest
    mask[15, 8, 8] = True  # 1 voxel
    assert piece_sizes(mask).tolist() == [64, 8, 1]
    assert significant_pieces([64, 8, 1]) == 2  # no typical size known: 10 % of the largest alone
    assert significant_pieces([64, 8, 1], typical=1000) == 1  # 8 < 1 % of the organ's usual 1000
    assert significant_pieces([64, 8, 1], typical=800) == 2
    assert significant_pieces([64, 5, 1], typical=100) == 1  # 5 < 10 % of 64
    assert significant_pieces([6.4e-5, 8e-6], typical=1e-4) == 2  # any unit: mm² of nuclei (64 and 8 um²)
    assert significant_pieces([]) == 0
    np.testing.assert_allclose(mask_centre(mask[1:5, 1:5, 1:5], (slice(1, 5),) * 3), [2.5, 2.5, 2.5])
    assert mask_centre(np.zeros((3, 3, 3), bool)) is None
