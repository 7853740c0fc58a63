"""How medseg runs a network on this machine: allocator, precision and memory layout.

None of this changes what is computed in fp32; each piece was kept because it paid in
`benchmarks/bench_speed.py` (numbers and the levers that were dropped: docs/performance.md).

- `keep_freed_memory`: glibc hands every freed block above 32 MiB back to the OS and page-faults it
  back in (zeroed) on the next window; a U-Net forward frees hundreds of such blocks. The CLI calls
  this once at start-up; Python users can call it themselves (it changes the whole process).
- `resolve_precision`: "auto" means bf16 autocast only where the hardware runs bf16 natively (CUDA
  GPUs with bf16; CPUs with AVX512-BF16 or AMX), fp32 elsewhere. It earned the default on the default
  prostate model: labels agree with fp32 on >= 99.99% of voxels and no organ's Dice moves by more than
  0.001 (benchmarks/bench_precision.py, results/precision.json).
- `prepare_network`: on the CPU, InstanceNorm3d runs as the equivalent GroupNorm (one group per
  channel: the same statistics, the same parameters and state-dict keys) because PyTorch's CPU
  instance norm is a reshaped batch norm ~3x slower than its group-norm kernel. For bf16 inference
  the weights also go to `channels_last_3d` (forward 1.13x faster); not for training (its backward
  ran 1.8x slower) and not in fp32 (the channels-last group-norm kernel sums in one pass and drifts
  by ~1e-4 relative, so fp32 would no longer equal the plain network).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from pathlib import Path

import torch
from torch import nn

from medseg.errors import InputError

PRECISIONS = ("auto", "bf16", "fp32")

# glibc <malloc.h> parameter numbers
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 1 << 30  # blocks up to 1 GiB come from (and go back to) the heap, not fresh mmaps


def keep_freed_memory(limit_bytes: int = _KEEP_BYTES) -> bool:
    """Let glibc keep freed memory for reuse instead of returning it to the OS.

    Same effect as `MALLOC_MMAP_THRESHOLD_=<limit> MALLOC_TRIM_THRESHOLD_=<limit>` in the environment,
    applied from inside the process (`mallopt`). Peak memory is unchanged; memory is not handed back
    between windows. Process-wide, so only entry points (the CLI, benchmarks) should call it.

    Returns:
        True if applied; False where the C library has no `mallopt` (macOS, Windows).
    """
    if not 0 < limit_bytes < 2**31:
        raise ValueError(f"limit_bytes must be in (0, 2 GiB), got {limit_bytes}")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, limit_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, limit_bytes))


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what decides the CPU's fp32 and bf16 speed


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """Which of `CPU_FLAGS` this CPU has (empty where /proc/cpuinfo cannot be read)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return []
    flags = {flag for line in text.splitlines() if line.startswith("flags") for flag in line.partition(":")[2].split()}
    return [flag for flag in CPU_FLAGS if flag in flags]


def cpu_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name, e.g. 'AMD EPYC 9R14' (the machine type where it cannot be read)."""
    import platform

    try:
        names = [line.partition(":")[2].strip() for line in Path(cpuinfo).read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.machine()


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 arithmetic units (x86 AVX512-BF16 or AMX-BF16).

    Without them PyTorch emulates bf16 and runs slower than fp32.
    """
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(check) for check in checks):
        return any(check() for check in checks)
    flags = set(cpu_flags(cpuinfo))
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_device(device: str = "auto") -> torch.device:
    """`--device` as a torch device: auto takes the GPU where there is one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device '{device}' requested but no CUDA GPU is available (use --device cpu)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device '{device}' (expected auto, cpu, cuda or cuda:N)") from None


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto', 'bf16' or 'fp32' -> 'bf16' or 'fp32' for `device`.

    'auto' picks bf16 on CUDA GPUs that support it and on CPUs with native bf16 units
    (`cpu_has_native_bf16`), fp32 elsewhere. An explicit 'bf16' is honoured everywhere.
    """
    if precision not in PRECISIONS:
        raise InputError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast where `resolve_precision` says bf16; plain fp32 otherwise."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def group_norm_for_instance_norm(network: nn.Module) -> nn.Module:
    """Swap every InstanceNorm3d and 2d (no running stats) for the identical GroupNorm, in place.

    GroupNorm with one channel per group normalises each (sample, channel) over its voxels, as
    instance norm does, with the same eps and per-channel affine; the Parameters are shared, so the
    state dict (keys `weight`, `bias`) loads into the unswapped network unchanged.
    """
    for module in list(network.modules()):
        for name, child in list(module.named_children()):
            if type(child) in (nn.InstanceNorm2d, nn.InstanceNorm3d) and not child.track_running_stats:
                norm = nn.GroupNorm(child.num_features, child.num_features, eps=child.eps, affine=child.affine)
                if child.affine:
                    norm.weight, norm.bias = child.weight, child.bias
                norm.train(child.training)
                setattr(module, name, norm)
    return network


def prepare_network(network: nn.Module, device: torch.device, precision: str = "auto",
                    training: bool = False, channels_last: bool | None = None) -> nn.Module:
    """Move `network` to `device` and lay it out for speed there (in place; returns it).

    On the CPU: GroupNorm kernels for instance norms, and channels-last weights where `channels_last`
    says so; None: for bf16 inference (`training=False`) only, training measures its layout
    (`medseg.train.budget.choose_layout`). Outputs in fp32 match the unprepared network within ~1e-5.
    """
    network.to(device)
    if device.type != "cpu":
        return network
    group_norm_for_instance_norm(network)
    if channels_last is None:
        channels_last = not training and resolve_precision(precision, device) == "bf16"
    if channels_last:
        planar = not any(p.dim() == 5 for p in network.parameters())  # a 2D network (`networks.Planar`)
        network.to(memory_format=torch.channels_last if planar else torch.channels_last_3d)
    return network
