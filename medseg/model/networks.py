"""One factory for MONAI networks, sized from the task file.

DynUNet is configured the way nnU-Net plans its U-Nets: an axis is downsampled only while its spacing is
within 2x of the finest axis and it still has at least 8 voxels, and convolutions along a much coarser
axis use a kernel of 1, so anisotropic CT (thick slices) gets in-plane context first. The DeepLab-style
network (`medseg.model.deeplab`) takes the same plan with its strides stopped at output stride 8.

A 2D task (`dimensions: 2`) is planned in-plane and gets the 2D network (`spatial_dims=2`) inside
`Planar`, which takes and returns (B, C, X, Y, 1) like the 3D ones: windows, losses and stitching are
those of 3D. The plan keeps three values per axis (the third 1) and records `dimensions`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from medseg.config import Network


@dataclass(frozen=True)
class NetworkPlan:
    """A network fully determined: rebuilt from this alone (it is stored in the model folder)."""

    name: str
    in_channels: int
    out_channels: int
    filters: tuple[int, ...]
    kernels: tuple[tuple[int, int, int], ...]  # per level
    strides: tuple[tuple[int, int, int], ...]  # per level; the first is (1, 1, 1)
    deep_supervision: bool
    dropout: float
    patch_size: tuple[int, int, int]
    dimensions: int = 3  # 2: a 2D network in `Planar` (kernels and strides along the third axis are 1)
    full_resolution: bool = False  # unet: its first level keeps the input's resolution (`Network.full_resolution`)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> NetworkPlan:
        return cls(data["name"], data["in_channels"], data["out_channels"], tuple(data["filters"]),
                   tuple(tuple(k) for k in data["kernels"]), tuple(tuple(s) for s in data["strides"]),
                   data["deep_supervision"], data["dropout"], tuple(data["patch_size"]), data.get("dimensions", 3),
                   data.get("full_resolution", False))

    def in_plane(self) -> NetworkPlan:
        """The plan of the 2D network inside `Planar`: two values per axis."""
        two = lambda values: tuple(tuple(v[:2]) for v in values)
        return replace(self, kernels=two(self.kernels), strides=two(self.strides), patch_size=self.patch_size[:2])

    @property
    def divisor(self) -> tuple[int, int, int]:
        """Patch sides must be multiples of this (the product of the strides per axis)."""
        out = [1, 1, 1]
        for stride in self.strides:
            out = [o * s for o, s in zip(out, stride)]
        return tuple(out)


def plan_network(config: Network, in_channels: int, out_channels: int, patch_size: tuple[int, int, int],
                 spacing: tuple[float, float, float], dimensions: int = 3) -> NetworkPlan:
    """Kernels and strides per level from patch size and spacing (nnU-Net's rule, simplified); a 2D task's
    in-plane only, the third axis kernel and stride 1."""
    kernels, strides = [], []
    size, current = list(patch_size[:dimensions]), list(spacing[:dimensions])
    for level in range(len(config.filters)):
        finest = min(current)
        if level == 0:
            stride = (1,) * dimensions
        else:
            stride = tuple(2 if (s <= 2 * finest and n >= 8 and n % 2 == 0) else 1 for s, n in zip(current, size))
            size = [n // st for n, st in zip(size, stride)]
            current = [s * st for s, st in zip(current, stride)]
            finest = min(current)
        kernels.append(tuple(3 if s <= 2 * finest else 1 for s in current))
        strides.append(stride)
    if config.name == "deeplab":  # output stride 8: deeper levels dilate instead of striding
        from medseg.model.deeplab import atrous_strides

        strides = list(atrous_strides(tuple(strides)))
    if dimensions == 2:
        kernels, strides = [(*k, 1) for k in kernels], [(*s, 1) for s in strides]
    return NetworkPlan(config.name, in_channels, out_channels, tuple(config.filters), tuple(kernels), tuple(strides),
                       config.deep_supervision and config.name == "dynunet", config.dropout, tuple(patch_size),
                       dimensions, config.full_resolution and config.name == "unet")


class Planar(nn.Module):
    """A 2D network for (B, C, X, Y, 1) windows: the singleton axis is dropped on the way in and restored
    on the way out (deep-supervision heads too), so everything around the network stays 3D."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out = self.net(x.squeeze(-1))
        return [o.unsqueeze(-1) for o in out] if isinstance(out, (list, tuple)) else out.unsqueeze(-1)


def build_network(plan: NetworkPlan) -> nn.Module:
    """The MONAI network a plan describes, with freshly initialised weights (2D: inside `Planar`)."""
    from monai.networks import nets

    if plan.dimensions == 2 and len(plan.patch_size) == 3:
        return Planar(build_network(plan.in_plane()))
    dims = len(plan.patch_size)
    if plan.name == "dynunet":
        return nets.DynUNet(
            spatial_dims=dims, in_channels=plan.in_channels, out_channels=plan.out_channels,
            kernel_size=[list(k) for k in plan.kernels], strides=[list(s) for s in plan.strides],
            upsample_kernel_size=[list(s) for s in plan.strides[1:]], filters=list(plan.filters),
            norm_name=("INSTANCE", {"affine": True}), act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
            deep_supervision=plan.deep_supervision, deep_supr_num=max(1, min(2, len(plan.filters) - 2)),
            res_block=False, dropout=plan.dropout or None,
        )
    if plan.name == "unet":
        # MONAI's UNet strides each level's first convolution: level k's stride goes first, so the plan's
        # (1, 1, 1) opens a full-resolution level; without it the first convolution already halves.
        strides = plan.strides[:-1] if plan.full_resolution else plan.strides[1:]
        return nets.UNet(spatial_dims=dims, in_channels=plan.in_channels, out_channels=plan.out_channels,
                         channels=plan.filters, strides=tuple(strides), num_res_units=2, norm="INSTANCE",
                         dropout=plan.dropout)
    if plan.name == "segresnet":
        return nets.SegResNet(spatial_dims=dims, in_channels=plan.in_channels, out_channels=plan.out_channels,
                              init_filters=plan.filters[0], dropout_prob=plan.dropout or None)
    if plan.name == "swinunetr":
        return nets.SwinUNETR(in_channels=plan.in_channels, out_channels=plan.out_channels,
                              feature_size=max(12, plan.filters[0] // 12 * 12), spatial_dims=dims)
    if plan.name == "deeplab":
        from medseg.model.deeplab import DeepLab

        return DeepLab(plan)
    raise ValueError(f"unknown network '{plan.name}' (expected dynunet, unet, segresnet, swinunetr or deeplab)")


def main_output(output: torch.Tensor | list | tuple) -> torch.Tensor:
    """The full-resolution logits of a network's training-mode output (deep supervision stacks heads)."""
    if isinstance(output, (list, tuple)):
        return output[0]
    return output
