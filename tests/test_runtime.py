"""The speed set-up changes nothing in fp32: same logits as plain MONAI, same state dict, fp32 on request."""

from __future__ import annotations

import copy

import pytest
import torch

from medseg import runtime
from medseg.errors import InputError
from medseg.infer.stitching import sliding_window_logits
from medseg.model.networks import NetworkPlan, build_network
from medseg.runtime import (
    autocast,
    cpu_has_native_bf16,
    group_norm_for_instance_norm,
    keep_freed_memory,
    prepare_network,
    resolve_precision,
)

CPU = torch.device("cpu")


def tiny_dynunet(seed: int = 0) -> torch.nn.Module:
    """A 3-level DynUNet like the task's, with norm affines moved off identity so the swap must carry them."""
    torch.manual_seed(seed)
    plan = NetworkPlan("dynunet", 1, 3, (4, 8, 16), ((3, 3, 3),) * 3, ((1, 1, 1), (2, 2, 2), (2, 2, 2)), True, 0.0,
                       (32, 32, 32))
    network = build_network(plan).eval()
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.InstanceNorm3d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    return network


def test_fp32_sliding_window_equals_plain_monai():
    from monai.inferers import sliding_window_inference

    plain = tiny_dynunet()
    image = torch.randn(1, 48, 48, 48) * 2 + 1
    with torch.inference_mode():
        expected = sliding_window_inference(image[None], (32, 32, 32), 1, plain, overlap=0.5, mode="gaussian")[0]
    fast = prepare_network(copy.deepcopy(plain), CPU, "fp32")
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in fast.modules())
    out = sliding_window_logits(fast, image, (32, 32, 32), 0.5, sw_batch_size=4, blending="gaussian", precision="fp32")
    assert out.shape == (3, 48, 48, 48) and out.dtype == torch.float32
    assert (out - expected).abs().max().item() <= 1e-4


def test_group_norm_swap_keeps_state_dict_and_values():
    plain = tiny_dynunet()
    swapped = group_norm_for_instance_norm(copy.deepcopy(plain))
    assert swapped.state_dict().keys() == plain.state_dict().keys()
    rebuilt = tiny_dynunet(seed=1)
    rebuilt.load_state_dict(swapped.state_dict())  # a checkpoint of the swapped net loads into the plain one
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(swapped(x), plain(x), atol=1e-5)
        assert torch.allclose(rebuilt(x), plain(x), atol=1e-5)


@pytest.mark.parametrize("precision, training, channels_last", [
    pytest.param("auto", False, True, id="bf16-inference"),
    pytest.param("auto", True, False, id="bf16-training"),
    pytest.param("fp32", False, False, id="fp32-inference"),
    pytest.param("fp32", True, True, id="fp32-training-measured-channels-last"),
])
def test_memory_format_follows_precision_and_use(monkeypatch, precision, training, channels_last):
    """The default layout, or the one a training run measured (`channels_last=` given)."""
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    asked = channels_last if (training and precision == "fp32") else None
    network = prepare_network(tiny_dynunet(), CPU, precision, training=training, channels_last=asked)
    conv = next(m for m in network.modules() if isinstance(m, torch.nn.Conv3d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d) is channels_last


def test_autocast_is_fp32_when_asked():
    conv = torch.nn.Conv3d(1, 2, 3)
    with autocast(CPU, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
        assert conv(torch.randn(1, 1, 5, 5, 5)).dtype == torch.float32
    with autocast(CPU, "bf16"):
        assert conv(torch.randn(1, 1, 5, 5, 5)).dtype == torch.bfloat16


@pytest.mark.parametrize("native, expected", [pytest.param(True, "bf16", id="bf16-cpu"),
                                              pytest.param(False, "fp32", id="plain-cpu")])
def test_auto_precision_follows_the_cpu(monkeypatch, native, expected):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"


def test_unknown_precision_is_refused():
    with pytest.raises(InputError, match="precision 'fp16' is not one of auto, bf16, fp32"):
        resolve_precision("fp16", CPU)


@pytest.mark.parametrize("flags, expected", [
    pytest.param("fpu avx2 avx512f avx512_bf16 avx512_vnni", True, id="avx512-bf16"),
    pytest.param("fpu avx2 amx_bf16 amx_tile", True, id="amx"),
    pytest.param("fpu avx2 avx512f", False, id="avx512-only"),
])
def test_cpu_bf16_detection_from_cpuinfo(tmp_path, monkeypatch, flags, expected):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert cpu_has_native_bf16(cpuinfo) is expected


def test_keep_freed_memory_checks_its_limit():
    assert keep_freed_memory() in (True, False)
    with pytest.raises(ValueError, match="limit_bytes must be in"):
        keep_freed_memory(2**31)
