"""medseg.infer.stitching: windows where MONAI puts them, blended exactly (fake predictors)."""

from __future__ import annotations

import pytest
import torch

from medseg.infer.stitching import sliding_window_logits, window_starts


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
