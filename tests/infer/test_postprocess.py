"""Largest connected component per organ: which pieces go, which stay, and what is left alone."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.infer.postprocess import keep_largest_component


def mask(order: str) -> np.ndarray:
    labels = np.zeros((40, 30, 20), np.uint8, order=order)
    labels[2:12, 2:12, 2:12] = 1  # bladder: 1000 voxels
    labels[20:23, 20:23, 10:13] = 1  # a 27-voxel stray piece of bladder
    labels[12, 12, 12] = 1  # touches the big piece by a corner only: 26-connected, so it stays
    labels[30:35, 5:9, 5:9] = 2  # another organ, in two pieces, not listed
    labels[36:38, 25:27, 15:17] = 2
    return labels


@pytest.mark.parametrize("order", ["C", "F"])
def test_only_the_largest_piece_of_a_listed_organ_stays(order):
    labels = mask(order)
    before = labels.copy()
    out = keep_largest_component(labels, [1])
    np.testing.assert_array_equal(labels, before)  # the input is left alone
    assert out.flags.f_contiguous == (order == "F")
    assert np.count_nonzero(out == 1) == 1001
    assert out[21, 21, 11] == 0 and out[12, 12, 12] == 1
    np.testing.assert_array_equal(out == 2, before == 2)  # not listed: both pieces kept


def test_in_place_changes_the_given_mask_and_matches_the_copy():
    labels = mask("F")
    copied = keep_largest_component(labels, [1, 2])
    returned = keep_largest_component(labels, [1, 2], in_place=True)
    assert returned is labels
    np.testing.assert_array_equal(labels, copied)
    assert np.count_nonzero(labels == 2) == 80  # the 5x4x4 piece, not the 2x2x2 one
    assert keep_largest_component(labels, [9])[0, 0, 0] == 0  # an organ absent from the mask


def test_an_organ_of_a_few_voxels_in_one_row():
    """Seen on a held-out head-and-neck CT: an esophagus of two voxels, one apart in one row. Its box is
    1 x 1 x 3, where cc3d 4.1 alone fails ("Label 2 cannot be mapped to union-find array of length 2")."""
    from medseg.geometry import piece_sizes

    labels = np.zeros((6, 5, 7), np.uint8)
    labels[3, 2, [1, 3]] = 5
    labels[1, 1:4, 1] = 1  # a column one voxel thick in two axes, in one piece
    assert piece_sizes(labels[3:4, 2:3, 1:4] == 5).tolist() == [1, 1]
    assert piece_sizes(labels[1:2, 1:4, 1:2] == 1).tolist() == [3]
    out = keep_largest_component(labels, [5, 1])
    assert np.count_nonzero(out == 5) == 1 and np.count_nonzero(out == 1) == 3
    assert piece_sizes(np.array([[True, False, True]])).tolist() == [1, 1]  # a 2D image's row


def test_scattered_voxels_in_a_thin_box():
    """Seen on a held-out head-and-neck CT: five voxels of one organ scattered in a 1 x 3 x 5 box, where
    cc3d 4.1 alone fails ("maximum length exception"). Each is its own piece: none touch, even diagonally."""
    from medseg.geometry import label_pieces, piece_sizes

    mask = np.zeros((1, 3, 5), bool)
    mask[0, [0, 0, 2, 2, 2], [0, 2, 0, 2, 4]] = True
    assert piece_sizes(mask).tolist() == [1] * 5
    pieces = label_pieces(mask)
    assert pieces.shape == mask.shape and sorted(np.unique(pieces[mask]).tolist()) == [1, 2, 3, 4, 5]
    mask[0, 1, 1] = True  # touches all four corners' neighbours diagonally: one piece of five, and one alone
    assert piece_sizes(mask).tolist() == [5, 1]
