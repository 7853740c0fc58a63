"""Sliding-window stitching with fake predictors, and masks landing on the input's exact grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torchio as tio
from conftest import BrightIsBladder, blob_case, make_grid, oracle_predictor

from medseg.io import write_label_map


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "PLI", "oblique"])
def test_mask_lands_on_input_grid(orientation, write_case, tmp_path):
    """At the scan's own spacing the round trip through RAS/model space is exact, for any voxel order."""
    image_path, label_path, grid = write_case(orientation=orientation)
    source = sitk.ReadImage(str(image_path))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))).transpose(2, 1, 0)
    canonical = tio.ToCanonical()(tio.ScalarImage(tensor=torch.from_numpy(labels[None]), affine=grid.ras_affine))
    seg = oracle_predictor(canonical.spacing).predict((labels[None].astype(np.float32), grid))
    out = write_label_map(seg.labels, seg.grid, tmp_path / "mask.nii.gz")
    written = sitk.ReadImage(str(out))
    assert written.GetSize() == source.GetSize()
    assert np.allclose(written.GetSpacing(), source.GetSpacing(), atol=1e-6)
    assert np.allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-4)
    assert np.allclose(written.GetDirection(), source.GetDirection(), atol=1e-6)
    assert written.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(written).transpose(2, 1, 0), labels)


@pytest.mark.parametrize("orientation", ["LPS", "PLI"])
def test_coarser_model_spacing_still_overlaps(orientation):
    """A model at 2 mm brings a one-organ mask back to a 1 mm grid with little loss at the boundary."""
    grid = make_grid(orientation, shape=(48, 44, 24), spacing=(1.0, 1.0, 2.0))
    _, labels = blob_case(grid)
    bladder = (labels == 2).astype(np.uint8)
    seg = oracle_predictor((2.0, 2.0, 2.0)).predict((bladder[None].astype(np.float32), grid))
    assert seg.labels.shape == labels.shape
    ref, pred = bladder == 1, seg.labels == 1
    assert 2 * (ref & pred).sum() / (ref.sum() + pred.sum()) > 0.85


def test_volumes_in_millilitres():
    grid = make_grid("LPS", shape=(10, 10, 10), spacing=(1.0, 2.0, 3.0))
    labels = np.zeros(grid.shape, np.uint8)
    labels[:5, :5, :4] = 2
    from medseg.infer.predictor import Segmentation

    volumes = Segmentation(labels, grid, {1: "prostate", 2: "bladder"}).volumes()
    assert volumes["bladder"] == {"volume_ml": pytest.approx(100 * 6 / 1000), "voxels": 100}
    assert volumes["prostate"]["voxels"] == 0


def test_crop_to_body_changes_little_on_a_phantom(tmp_path):
    """Windows over the body only: for a network that looks voxel by voxel, the very same mask."""
    from dataclasses import replace

    grid = make_grid("LPS", shape=(64, 56, 20), spacing=(1.0, 1.0, 3.0))
    image, _ = blob_case(grid)
    image = image.astype(np.float32)
    air = np.ones(grid.shape, bool)
    air[16:48, 14:42, :] = False
    image[air] = -1000.0
    predictor = oracle_predictor((1.5, 1.5, 3.0))
    predictor.bundle.network = BrightIsBladder().eval()
    cropped = predictor.predict((image[None], grid)).labels
    uncropped_task = replace(predictor.task, inference=replace(predictor.task.inference, crop_to_body=False))
    predictor.bundle.task = uncropped_task
    whole = predictor.predict((image[None], grid)).labels
    assert (whole == 2).sum() > 100
    assert np.array_equal(cropped, whole)


