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
