"""A DeepLab-style network (DeepLabv3+, Chen et al. 2018) built from MONAI blocks, planned like the U-Nets.

Encoder: one MONAI `ResidualUnit` per level of the plan (instance norm, leaky ReLU). The levels stride as
the U-Net plan says until the output stride (8 per axis) is reached; deeper levels keep that resolution
and dilate their kernels instead (atrous convolution, the dilation doubling per level), so context keeps
growing without losing the small organs to a 16x or 32x coarser map.

Head: MONAI's `SimpleASPP`, four parallel convolutions with dilations 1, 2, 4, 6 voxels of the stride-8
map, each capped along an axis at half the map's size there (a thin axis would sample only padding).
DeepLabv3's image-level pooling branch is left out: inference runs on sliding windows, and a window-wide
average would make each window's logits depend on where the window falls.

Decoder (the "+"): the ASPP output upsampled (trilinear) to the stride-4 level, concatenated with a 1x1
projection of that level's features, two convolutions, a 1x1 classifier, then trilinear upsampling to
the input size. No deep supervision: the only output is the full-resolution logits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from medseg.model.networks import NetworkPlan

OUTPUT_STRIDE = 8  # the encoder's coarsest resolution, per axis (DeepLabv3+ uses 8 or 16)
ASPP_DILATIONS = (1, 2, 4, 6)  # in voxels of the stride-8 map (DeepLabv3's 6, 12, 18 at stride 16, scaled down)
NORM = ("INSTANCE", {"affine": True})
ACT = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})


def atrous_strides(strides: tuple[tuple[int, ...], ...],
                   output_stride: int = OUTPUT_STRIDE) -> tuple[tuple[int, ...], ...]:
    """A U-Net plan's strides per level, with every stride that would pass `output_stride` on an axis set to 1."""
    total, out = [1] * len(strides[0]), []
    for stride in strides:
        step = tuple(s if t * s <= output_stride else 1 for s, t in zip(stride, total))
        total = [t * s for t, s in zip(total, step)]
        out.append(step)
    return tuple(out)


def _dilations(plan: NetworkPlan) -> list[tuple[int, ...]]:
    """Per level: 1 while the level strides, then doubling per level that does not; only along axes with a
    3-wide kernel, and at most half the feature map there."""
    size, rate, out = list(plan.patch_size), 1, []
    for level, (stride, kernel) in enumerate(zip(plan.strides, plan.kernels)):
        size = [n // s for n, s in zip(size, stride)]
        rate = rate * 2 if level > 0 and all(s == 1 for s in stride) else rate
        out.append(tuple(min(rate, max(1, n // 2)) if k > 1 else 1 for n, k in zip(size, kernel)))
    return out


class DeepLab(nn.Module):
    """Residual atrous encoder, ASPP, DeepLabv3+ decoder: `(B, in, *patch) -> (B, out, *patch)` logits."""

    def __init__(self, plan: NetworkPlan):
        super().__init__()
        from monai.networks.blocks import Convolution, ResidualUnit, SimpleASPP

        dims, filters = len(plan.patch_size), plan.filters
        self.mode = ("linear", "bilinear", "trilinear")[dims - 1]
        strided = [level for level, s in enumerate(plan.strides) if any(x > 1 for x in s)]
        self.skip_level = min(2, strided[-1] if strided else 0)  # the stride-4 level (or the coarsest short of it)
        channels = [plan.in_channels, *filters]
        self.encoder = nn.ModuleList(
            ResidualUnit(dims, channels[i], channels[i + 1], strides=plan.strides[i], kernel_size=plan.kernels[i],
                         subunits=2, act=ACT, norm=NORM, dropout=plan.dropout or None, dilation=dilation)
            for i, dilation in enumerate(_dilations(plan)))
        size = [n // d for n, d in zip(plan.patch_size, plan.divisor)]
        branch = max(1, filters[-1] // len(ASPP_DILATIONS))
        kernels = [1] + [plan.kernels[-1]] * (len(ASPP_DILATIONS) - 1)  # a 1x1 branch, then dilated ones
        self.aspp = SimpleASPP(dims, filters[-1], branch, kernel_sizes=kernels, norm_type=NORM, acti_type=ACT,
                               dilations=[tuple(min(d, max(1, n // 2)) if k > 1 else 1 for n, k in
                                                zip(size, plan.kernels[-1])) for d in ASPP_DILATIONS])
        low, width = filters[min(1, len(filters) - 1)], filters[self.skip_level]
        self.skip = Convolution(dims, filters[self.skip_level], low, kernel_size=1, act=ACT, norm=NORM)
        kernel = plan.kernels[self.skip_level]
        self.decoder = nn.Sequential(
            Convolution(dims, branch * len(ASPP_DILATIONS) + low, width, kernel_size=kernel, act=ACT, norm=NORM),
            Convolution(dims, width, width, kernel_size=kernel, act=ACT, norm=NORM))
        self.head = Convolution(dims, width, plan.out_channels, kernel_size=1, conv_only=True, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = x
        for level, block in enumerate(self.encoder):
            features = block(features)
            if level == self.skip_level:
                low = self.skip(features)
        context = F.interpolate(self.aspp(features), size=low.shape[2:], mode=self.mode, align_corners=False)
        logits = self.head(self.decoder(torch.cat([context, low], 1)))
        return F.interpolate(logits, size=x.shape[2:], mode=self.mode, align_corners=False)
