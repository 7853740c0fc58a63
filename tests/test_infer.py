"""Sliding-window stitching with fake predictors, and masks landing on the input's exact grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torchio as tio

from medseg.config import load_task
from medseg.infer.predictor import ModelBundle, Predictor
from medseg.infer.stitching import sliding_window_logits, window_starts
from medseg.infer.resample import resample_probabilities
from medseg.io import write_label_map
from medseg.model.networks import NetworkPlan
from medseg.data.preprocess import ChannelIntensity, Preprocessing

from conftest import blob_case, make_grid


class Oracle(torch.nn.Module):
    """Reads the label id straight off the voxel value: logits peak at round(x)."""

    def __init__(self, classes: int = 6):
        super().__init__()
        self.register_buffer("ids", torch.arange(classes, dtype=torch.float32).view(1, classes, 1, 1, 1))

    def forward(self, x):
        return -10.0 * (x[:, :1] - self.ids) ** 2


class SideAware(torch.nn.Module):
    """Calls a bright voxel 'left' (4) in the low-index half of RAS axis 0 and 'right' (5) otherwise,
    as a trained network would: by where it sits, not by what it was called."""

    def forward(self, x):
        bright = x[:, :1] > 0.5
        low = torch.zeros_like(bright)
        low[:, :, : x.shape[2] // 2] = True
        logits = torch.zeros(x.shape[0], 6, *x.shape[2:])
        logits[:, 0] = (~bright)[:, 0].float()
        logits[:, 4] = (bright & low)[:, 0].float()
        logits[:, 5] = (bright & ~low)[:, 0].float()
        return logits


def oracle_predictor(spacing, network=None, tta=False, patch=(16, 16, 16)) -> Predictor:
    task = load_task("prostate")
    prep = Preprocessing(tuple(spacing), "none", (ChannelIntensity(None, 0.0, 1.0),))
    plan = NetworkPlan("unet", 1, 6, (4, 8), ((3, 3, 3),) * 2, ((1, 1, 1), (2, 2, 2)), False, 0.0, patch)
    bundle = ModelBundle(None, task, prep, plan, (network or Oracle()).eval(), torch.device("cpu"))
    return Predictor(bundle, tta=tta)


@pytest.mark.parametrize("overlap", [0.0, 0.5])
@pytest.mark.parametrize("blending", ["gaussian", "constant"])
def test_identity_predictor_stitches_exactly(overlap, blending):
    image = torch.randn(3, 37, 29, 21)
    out = sliding_window_logits(torch.nn.Identity(), image, (16, 16, 8), overlap, sw_batch_size=3, blending=blending)
    assert out.shape == image.shape
    assert torch.allclose(out, image, atol=1e-5)


def test_channels_last_output_stitches_exactly():
    """A network that answers in channels-last (the bf16 CPU network) is blended in that layout."""
    def three_classes_channels_last(x):
        return torch.cat([x, 2 * x, -x], 1).contiguous(memory_format=torch.channels_last_3d)

    image = torch.randn(1, 37, 29, 21)
    out = sliding_window_logits(three_classes_channels_last, image, (16, 16, 8), 0.5, sw_batch_size=2)
    assert out.shape == (3, 37, 29, 21)
    assert torch.allclose(out, torch.cat([image, 2 * image, -image]), atol=1e-5)


@pytest.mark.parametrize("size", [1, 15, 16, 17, 31, 32, 33, 100])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
def test_window_starts_are_monais(size, overlap):
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    padded = max(size, 16)
    interval = _get_scan_interval((padded,), (16,), 1, (overlap,))
    expected = [s[0].start for s in dense_patch_slices((padded,), (16,), interval)]
    assert window_starts(padded, 16, overlap) == expected


@pytest.mark.parametrize("shape", [(40, 33, 21), (12, 50, 9), (16, 16, 16)], ids=["larger", "smaller", "equal"])
@pytest.mark.parametrize("blending", ["gaussian", "constant"])
def test_stitching_equals_monai_sliding_window(shape, blending):
    """Same windows, padding and weights as MONAI: a convolution's edge effects give away any shift."""
    from monai.inferers import sliding_window_inference

    torch.manual_seed(0)
    network = torch.nn.Conv3d(2, 3, 3, padding=1).eval()
    image = torch.randn(2, *shape)
    with torch.inference_mode():
        expected = sliding_window_inference(image[None], (16, 16, 16), 3, network, overlap=0.4, mode=blending,
                                            padding_mode="replicate")[0]
    out = sliding_window_logits(network, image, (16, 16, 16), 0.4, sw_batch_size=3, blending=blending, precision="fp32")
    assert out.shape == (3, *shape)
    assert (out - expected).abs().max().item() <= 1e-5


def test_constant_predictor_gives_constant_output():
    def constant(x):
        return torch.full((x.shape[0], 4, *x.shape[2:]), 2.5)

    out = sliding_window_logits(constant, torch.zeros(1, 30, 20, 12), (16, 16, 16), 0.5)
    assert out.shape == (4, 30, 20, 12)
    assert torch.allclose(out, torch.full_like(out, 2.5), rtol=0, atol=1e-6)  # blending weights sum to 1


def test_resample_probabilities_on_same_grid_is_argmax():
    grid = make_grid("RAS", shape=(20, 18, 9))
    probabilities = torch.softmax(torch.randn(6, *grid.shape), 0)
    labels, kept = resample_probabilities(probabilities, grid.ras_affine, grid, slab_voxels=500, keep=True)
    assert np.array_equal(labels, probabilities.argmax(0).numpy())
    assert kept.shape == (6, *grid.shape) and kept.dtype == np.uint8


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


def test_tta_keeps_left_organ_on_the_left():
    grid = make_grid("LPS", shape=(40, 30, 20), spacing=(1.0, 1.0, 1.0))
    image = np.zeros(grid.shape, np.float32)
    image[5:12, 10:20, 5:15] = 1.0  # LPS axis 0 points left: high index = patient's left
    image[28:35, 10:20, 5:15] = 1.0
    # one window covers the volume, so the fake network's "low half" is the volume's
    plain = oracle_predictor((1.0, 1.0, 1.0), SideAware(), patch=(40, 32, 24)).predict((image[None], grid))
    flipped = oracle_predictor((1.0, 1.0, 1.0), SideAware(), tta=True, patch=(40, 32, 24)).predict((image[None], grid))
    assert set(np.unique(plain.labels[28:35, 10:20, 5:15])) == {4}  # patient's left
    assert set(np.unique(plain.labels[5:12, 10:20, 5:15])) == {5}
    assert np.array_equal(plain.labels, flipped.labels)


def test_volumes_in_millilitres():
    grid = make_grid("LPS", shape=(10, 10, 10), spacing=(1.0, 2.0, 3.0))
    labels = np.zeros(grid.shape, np.uint8)
    labels[:5, :5, :4] = 2
    from medseg.infer.predictor import Segmentation

    volumes = Segmentation(labels, grid, {1: "prostate", 2: "bladder"}).volumes()
    assert volumes["bladder"] == {"volume_ml": pytest.approx(100 * 6 / 1000), "voxels": 100}
    assert volumes["prostate"]["voxels"] == 0


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


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "PLI", "oblique"])
def test_cropped_way_back_equals_the_whole_volume(orientation):
    """Probabilities on a box (background outside) go back exactly as the whole volume's would."""
    from medseg.infer.resample import resample_box
    from medseg.data.preprocess import model_grid

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


class BrightIsBladder(torch.nn.Module):
    """Bladder (2) wherever the voxel is brighter than soft tissue, by its own value alone."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 6, *x.shape[2:])
        logits[:, 2] = x[:, 0] - 20.0
        return logits


@pytest.mark.parametrize("orientation", ["LPS", "PLI", "oblique"])
def test_way_back_inside_the_organ_box_gives_the_same_labels(orientation):
    """Labels interpolated only around voxels an organ can win equal the whole volume's, exactly."""
    from medseg.infer.resample import contested_box, resample_box
    from medseg.data.preprocess import model_grid

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
