"""medseg.infer.resample: the way back to the scan's grid, separable or general, cropped or whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchio as tio
from conftest import make_grid

from medseg.infer.resample import resample_probabilities


def test_resample_probabilities_on_same_grid_is_argmax():
    grid = make_grid("RAS", shape=(20, 18, 9))
    probabilities = torch.softmax(torch.randn(6, *grid.shape), 0)
    labels, kept = resample_probabilities(probabilities, grid.ras_affine, grid, slab_voxels=500, keep=True)
    assert np.array_equal(labels, probabilities.argmax(0).numpy())
    assert kept.shape == (6, *grid.shape) and kept.dtype == np.uint8


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "PLI", "oblique"])
def test_separable_way_back_equals_trilinear_grid_sample(orientation):
    """The fast path (three 1D passes) computes grid_sample's trilinear interpolation exactly."""
    from medseg.infer.resample import _axis_aligned, _general_slabs

    grid = make_grid(orientation, shape=(61, 47, 23), spacing=(0.9, 1.1, 2.5))
    model = tio.Resample((1.5, 1.5, 3.0))(tio.ToCanonical()(tio.ScalarImage(tensor=torch.zeros(1, *grid.shape),
                                                                            affine=grid.ras_affine)))
    probabilities = torch.softmax(3 * torch.randn(6, *model.spatial_shape, generator=torch.Generator().manual_seed(0)), 0)
    mapping = np.linalg.inv(model.affine) @ grid.ras_affine
    assert _axis_aligned(mapping) is not None  # reorienting and rescaling keeps every axis on one model axis
    labels, kept = resample_probabilities(probabilities, model.affine, grid, slab_voxels=3000, keep=True)
    expected = _general_slabs(probabilities, mapping, grid.shape)(np.arange(grid.shape[2]))  # (X, Y, Z, K)
    assert np.array_equal(labels, expected.argmax(-1).numpy())
    percent = (expected.clamp(0, 1) * 100).round().permute(3, 0, 1, 2).numpy()
    assert np.abs(kept.astype(int) - percent.astype(int)).max() <= 1  # rounding of equal values to 1e-6


def test_rotated_model_grid_takes_the_general_path():
    from medseg.infer.resample import _axis_aligned

    grid = make_grid("LPS", shape=(20, 18, 9))
    rotated = make_grid("oblique", shape=(20, 18, 9))
    assert _axis_aligned(np.linalg.inv(rotated.ras_affine) @ grid.ras_affine) is None
    labels, _ = resample_probabilities(torch.softmax(torch.randn(3, 20, 18, 9), 0), rotated.ras_affine, grid)
    assert labels.shape == grid.shape


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "PLI", "oblique"])
def test_cropped_way_back_equals_the_whole_volume(orientation):
    """Probabilities on a box (background outside) go back exactly as the whole volume's would."""
    from medseg.data.preprocess import model_grid
    from medseg.infer.resample import resample_box

    grid = make_grid(orientation, shape=(61, 47, 23), spacing=(0.9, 1.1, 2.5))
    model = model_grid((1.5, 1.5, 3.0), grid)
    whole = torch.zeros(6, *model.shape)
    whole[0] = 1.0
    for box in [(slice(5, 25), slice(3, 20), slice(2, 12)), (slice(0, 25), slice(10, model.shape[1]), slice(0, 9))]:
        inside = torch.softmax(3 * torch.randn(6, *[s.stop - s.start for s in box],
                                               generator=torch.Generator().manual_seed(0)), 0)
        probabilities = whole.clone()
        probabilities[(slice(None), *box)] = inside
        expected, expected_kept = resample_probabilities(probabilities, model.ras_affine, grid, keep=True)
        labels, kept = resample_box(inside.clone(), box, model, grid, keep=True)
        assert 0 < (labels > 0).sum() < labels.size
        assert np.array_equal(labels, expected)
        assert np.abs(kept.astype(int) - expected_kept.astype(int)).max() <= 1


@pytest.mark.parametrize("orientation", ["LPS", "PLI", "oblique"])
def test_way_back_inside_the_organ_box_gives_the_same_labels(orientation):
    """Labels interpolated only around voxels an organ can win equal the whole volume's, exactly."""
    from medseg.data.preprocess import model_grid
    from medseg.infer.resample import contested_box, resample_box

    grid = make_grid(orientation, shape=(61, 47, 23), spacing=(0.9, 1.1, 2.5))
    model = model_grid((1.5, 1.5, 3.0), grid)
    logits = 0.5 * torch.randn(6, *model.shape, generator=torch.Generator().manual_seed(1))
    logits[0] += 4.0  # background almost everywhere ...
    logits[2, 10:18, 6:14, 3:8] += 8.0  # ... but a bladder, with a soft edge
    logits[3, 12:16, 0:4, 0:3] += 8.0  # and a rectum at the edge of the volume
    probabilities = torch.softmax(logits, 0)
    box = contested_box(probabilities)
    assert box[1].start == box[2].start == 0 and box[0].start > 0
    assert all(b.stop - b.start < n for b, n in zip(box, model.shape))  # a real saving
    expected, _ = resample_probabilities(probabilities, model.ras_affine, grid)
    labels, _ = resample_box(probabilities[(slice(None), *box)].clone(), box, model, grid)
    assert (expected == 2).sum() > 50 and (expected == 3).sum() > 5
    assert np.array_equal(labels, expected)
