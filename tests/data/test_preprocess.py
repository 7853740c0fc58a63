"""Prediction's road to the model grid (`to_model_grid`) against TorchIO's (`preprocess`)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torchio as tio
from conftest import make_grid

from medseg.data.preprocess import (
    ChannelIntensity,
    Preprocessing,
    model_grid,
    normalize_,
    preprocess,
    to_model_grid,
    to_subject,
)
from medseg.io import from_array

CT = Preprocessing((1.5, 1.5, 3.0), "dataset", (ChannelIntensity((-200.0, 300.0), 40.0, 60.0),))
MR = Preprocessing((1.3, 1.7, 2.0), "image", (ChannelIntensity(None, 0.0, 1.0), ChannelIntensity(None, 0.0, 1.0)))


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "PLI", "oblique"])
def test_int16_scan_lands_where_torchio_puts_it(orientation):
    """Same grid, same affine, same voxels as ToCanonical + Resample + clip/normalise, from int16."""
    grid = make_grid(orientation, shape=(41, 37, 23), spacing=(0.9, 1.1, 2.5))
    image = np.random.default_rng(0).integers(-1000, 1500, size=(1, *grid.shape)).astype(np.int16)
    expected = preprocess(CT, image.astype(np.float32), grid)["image"]
    volume, target = to_model_grid(image, grid, CT.spacing)
    normalize_(volume, CT)
    assert target.shape == expected.spatial_shape
    np.testing.assert_allclose(target.ras_affine, expected.affine, atol=1e-9)
    np.testing.assert_allclose(volume.numpy(), expected.data.numpy(), atol=1e-5)


def test_two_channel_mr_z_scored_like_torchio():
    grid = make_grid("PLI", shape=(30, 26, 14), spacing=(1.0, 1.2, 2.2))
    image = np.random.default_rng(1).normal(300, 80, size=(2, *grid.shape)).astype(np.float32)
    torchio_way = tio.Compose([tio.ToCanonical(), tio.Resample(MR.spacing), tio.ZNormalization()])
    expected = torchio_way(to_subject(image, grid))["image"].data.numpy()
    volume, _ = to_model_grid(image, grid, MR.spacing)
    np.testing.assert_allclose(normalize_(volume, MR).numpy(), expected, atol=1e-4)


def test_model_grid_matches_simpleitk_physical_space():
    """Checked with SimpleITK itself: the model grid covers the scan's centre, at the model spacing."""
    grid = make_grid("oblique", shape=(64, 50, 20), spacing=(0.8, 0.8, 2.5))
    target = model_grid((1.5, 1.5, 3.0), grid)
    scan = from_array(np.zeros(grid.shape, np.uint8), grid)
    centre = scan.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in grid.shape])
    model = target.apply_to(sitk.Image(list(target.shape), sitk.sitkUInt8))
    middle = model.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in target.shape])
    np.testing.assert_allclose(middle, centre, atol=1e-6)
    assert sorted(target.spacing) == [1.5, 1.5, 3.0]
