"""medseg.model.networks: 2D tasks plan in-plane and run a 2D network on (B, C, X, Y, 1) windows."""

from __future__ import annotations

import pytest
import torch

from medseg.config import Network
from medseg.model.networks import NetworkPlan, Planar, build_network, plan_network
from medseg.runtime import prepare_network


def plan_2d(name: str, filters=(4, 8, 16), patch=(32, 32, 1)) -> NetworkPlan:
    return plan_network(Network(name=name, filters=filters), 2, 3, patch, (0.5, 0.5, 1.0), dimensions=2)


def test_2d_plan_strides_in_plane_and_records_its_dimensions():
    plan = plan_2d("dynunet")
    assert plan.dimensions == 2
    assert plan.strides == ((1, 1, 1), (2, 2, 1), (2, 2, 1))
    assert all(k == (3, 3, 1) for k in plan.kernels)
    assert NetworkPlan.from_dict(plan.to_dict()) == plan
    old = {k: v for k, v in plan_network(Network(), 1, 3, (32, 32, 16), (1.0,) * 3).to_dict().items() if k != "dimensions"}
    assert NetworkPlan.from_dict(old).dimensions == 3  # model folders from before 2D tasks are 3D


@pytest.mark.parametrize("name", ["unet", "dynunet", "deeplab"])
def test_2d_network_maps_windows_to_logits_of_their_shape(name):
    network = build_network(plan_2d(name))
    assert isinstance(network, Planar)
    assert all(p.dim() != 5 for p in network.parameters())  # a 2D network: no 3D kernels
    network.eval()
    with torch.no_grad():
        out = network(torch.randn(2, 2, 32, 32, 1))
    assert out.shape == (2, 3, 32, 32, 1)


def test_2d_deep_supervision_heads_keep_the_singleton_axis():
    network = build_network(plan_2d("dynunet"))
    network.train()
    out = network(torch.randn(2, 2, 32, 32, 1))
    assert out.dim() == 6 and out.shape[-1] == 1  # (B, heads, K, X, Y, 1), as the 3D steps unbind them


def test_2d_network_prepared_for_bf16_inference_on_the_cpu():
    """The CPU's bf16 layout is channels-last (2D), not channels_last_3d, which a 2D kernel cannot take."""
    network = prepare_network(build_network(plan_2d("unet")).eval(), torch.device("cpu"), precision="bf16")
    with torch.no_grad():
        assert network(torch.randn(1, 2, 32, 32, 1)).shape == (1, 3, 32, 32, 1)


def first_convolution_stride(network: torch.nn.Module) -> tuple[int, ...]:
    return next(m for m in network.modules() if isinstance(m, torch.nn.Conv3d)).stride


def test_unet_full_resolution_level_keeps_the_input_grid_and_the_same_halvings():
    spacing, patch = (1.0, 1.0, 1.0), (32, 32, 16)
    plain = plan_network(Network(name="unet", filters=(4, 8, 16, 32)), 1, 3, patch, spacing)
    full = plan_network(Network(name="unet", filters=(2, 4, 8, 16, 32), full_resolution=True), 1, 3, patch, spacing)
    assert full.full_resolution and not plain.full_resolution
    assert NetworkPlan.from_dict(full.to_dict()) == full
    assert not NetworkPlan.from_dict({k: v for k, v in plain.to_dict().items() if k != "full_resolution"}).full_resolution
    assert first_convolution_stride(build_network(plain)) == (2, 2, 2)  # MONAI's UNet halves at once
    network = build_network(full)
    assert first_convolution_stride(network) == (1, 1, 1)
    x = torch.randn(1, 1, *patch)
    assert network(x).shape == build_network(plain)(x).shape == (1, 3, *patch)
    # the same halvings below it: as many strided convolutions in both (a level's unit and its residual)
    strided = lambda net: sorted(m.stride for m in net.modules() if isinstance(m, torch.nn.Conv3d) and max(m.stride) > 1)
    assert strided(network) == strided(build_network(plain)) and len(strided(network)) == 6
    # the flag means nothing to another network, and is not recorded for it
    assert not plan_network(Network(name="dynunet", full_resolution=True), 1, 3, patch, spacing).full_resolution
