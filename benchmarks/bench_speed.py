"""Speed of medseg's inference and training steps against the plain MONAI way, side by side.

The prostate task's network (DynUNet 16..192, patch 96 x 96 x 32 at 1.5 x 1.5 x 3 mm; random weights:
timing does not depend on them) runs every variant in one process, interleaved round by round (the
order rotates each round), medians of `--repeats` runs. "plain" is what a MONAI user writes:
`sliding_window_inference` with its defaults (sw_batch_size 1, NCDHW, fp32) and glibc's allocator; the
training loop is the textbook MONAI one with the same loss, optimiser and gradient clipping.

Two clocks: wall time, and CPU time (`time.process_time`, all threads). On a machine shared with other
jobs wall time swings by 2-3x from run to run; CPU time counts only the cycles this process got, so its
ratios are steadier. Both are reported; ratios are medians of the per-round ratios.

glibc's allocator is process-wide, so "default allocator" variants restore the thresholds glibc settles
at by itself for large tensors (mmap above 32 MiB, its dynamic threshold's ceiling; trim above 64 MiB),
and medseg variants apply `medseg.runtime.keep_freed_memory` as the CLI does. Minor page faults per run
are reported as the allocator's deterministic footprint.

    python benchmarks/bench_speed.py --section levers      # per-window forward: every lever on its own
    python benchmarks/bench_speed.py --section inference   # sliding window over a volume, medseg vs plain
    python benchmarks/bench_speed.py --section training    # one optimisation step, medseg vs plain
Each prints its JSON and merges it into benchmarks/results/speed.json.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import dataclasses
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from medseg.config import load_task
from medseg.infer.stitching import sliding_window_logits
from medseg.model.networks import build_network, plan_network
from medseg.runtime import cpu_has_native_bf16, keep_freed_memory, prepare_network

RESULTS = Path(__file__).resolve().parent / "results" / "speed.json"
CPU = torch.device("cpu")
CL = torch.channels_last_3d


# ------------------------------------------------------------------------------------- harness


def glibc_default_allocator() -> None:
    """glibc's steady state for big blocks: mmap (and unmap on free) above 32 MiB, trim above 64 MiB."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD


@dataclasses.dataclass
class Variant:
    name: str
    run: Callable[[], object]
    keep_memory: bool  # medseg's allocator setting, else glibc's default
    note: str = ""
    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)
    faults: list[int] = dataclasses.field(default_factory=list)

    def once(self, rewarm: bool = False) -> None:
        keep_freed_memory() if self.keep_memory else glibc_default_allocator()
        if rewarm:
            self.run()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        cpu, wall = time.process_time(), time.perf_counter()
        self.run()
        self.wall.append(time.perf_counter() - wall)
        self.cpu.append(time.process_time() - cpu)
        self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)


def compare(variants: list[Variant], repeats: int, per: int = 1, flops: float | None = None,
            ceiling: Variant | None = None) -> dict:
    """Warm each variant up once, then `repeats` interleaved rounds; summary against variants[0].

    `per`: units (windows, steps) per run, for per-unit times. `flops`: FLOPs per unit, for GFLOP/s.
    `ceiling`: a variant whose GFLOP/s (FLOPs in its note) is the fp32 conv3d ceiling.
    """
    for variant in variants:
        variant.once()
        variant.wall.clear(), variant.cpu.clear(), variant.faults.clear()
    keeping = True
    for round_ in range(repeats):
        order = variants[round_ % len(variants):] + variants[:round_ % len(variants)]
        for variant in order:
            # A medseg process faults its heap in once, at its first window; after a glibc-default run has
            # trimmed the heap, an untimed run first keeps the toggling from charging that every round.
            variant.once(rewarm=variant.keep_memory and not keeping)
            keeping = variant.keep_memory
        print(f"round {round_ + 1}/{repeats}: " + ", ".join(f"{v.name} {v.wall[-1]:.2f}s" for v in variants),
              file=sys.stderr, flush=True)
    base = variants[0]
    threads = torch.get_num_threads()
    out = {}
    for variant in variants:
        row = {
            "wall_s_median": statistics.median(variant.wall) / per,
            "wall_s_min": min(variant.wall) / per,
            "cpu_s_median": statistics.median(variant.cpu) / per,
            "page_faults_per_run_median": int(statistics.median(variant.faults)),
            "speedup_wall": statistics.median(b / v for b, v in zip(base.wall, variant.wall)),
            "speedup_cpu": statistics.median(b / v for b, v in zip(base.cpu, variant.cpu)),
            "runs_wall_s": [round(t, 3) for t in variant.wall],
        }
        if flops:
            row["gflops_wall"] = flops / row["wall_s_median"] / 1e9
            row["gflops_cpu"] = flops / (row["cpu_s_median"] / threads) / 1e9  # per wall-second of all threads
        if variant.note:
            row["note"] = variant.note
        out[variant.name] = row
    return out


def machine() -> dict:
    flags, model = set(), platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.partition(":")[2].split())
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
    except OSError:
        pass
    import monai

    return {
        "cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
        "native_bf16 (medseg.runtime)": cpu_has_native_bf16(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__, "monai": monai.__version__, "python": platform.python_version(),
        "glibc": platform.libc_ver()[1],
        "shared": "yes: 2 cores shared with other engineers' test runs; trust ratios (CPU-time ones most), not times",
    }


def prostate_network() -> tuple[torch.nn.Module, object, object]:
    task = load_task("prostate")
    plan = plan_network(task.network, len(task.channels), task.num_classes, task.patch_size, task.spacing)
    torch.manual_seed(0)
    network = build_network(plan)
    with torch.no_grad():  # move norm affines off identity, as training does, so every swap must carry them
        for module in network.modules():
            if isinstance(module, torch.nn.InstanceNorm3d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    return network, task, plan


def flops_per_window(network: torch.nn.Module, patch: tuple[int, int, int]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        network(torch.randn(1, 1, *patch))
    return float(counter.get_total_flops())


def prepared(network: torch.nn.Module, precision: str, training: bool = False, norms: bool = True,
             channels_last: bool | None = None) -> torch.nn.Module:
    """A copy of `network` laid out by medseg (or with one lever changed, for the lever table)."""
    copy_ = copy.deepcopy(network).eval()
    if norms:
        prepare_network(copy_, CPU, precision, training)
    if channels_last is True:
        copy_.to(memory_format=CL)
    if channels_last is False:
        copy_.to(memory_format=torch.contiguous_format)
    return copy_


# ------------------------------------------------------------------------------------ sections


def levers(repeats: int) -> dict:
    """One batch of 4 windows through the network, one lever at a time; and the conv3d ceiling."""
    network, task, plan = prostate_network()
    network.eval()
    patch = plan.patch_size
    windows = torch.randn(4, 1, *patch)
    native = cpu_has_native_bf16()

    def forward(net, bf16=False, batch=4):
        def run():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return torch.cat([net(windows[i:i + batch]).float() for i in range(0, 4, batch)])
        return run

    nets = {
        "gn": prepared(network, "fp32"),
        "cl": prepared(network, "fp32", norms=False, channels_last=True),
        "gn_cl": prepared(network, "fp32", channels_last=True),
        "bf16": prepared(network, "bf16"),
        "bf16_ncdhw": prepared(network, "bf16", channels_last=False),
    }
    variants = [
        Variant("plain: batch 1, NCDHW, InstanceNorm, fp32, glibc default", forward(network, batch=1), False),
        Variant("+ batch 4 windows (task sw_batch_size), glibc default", forward(network), False),
        Variant("+ batch 4 + keep freed memory (kept)", forward(network), True),
        Variant("+ batch 4 + keep memory + GroupNorm kernel = medseg fp32 (kept)", forward(nets["gn"]), True),
        Variant("medseg fp32 at batch 1 (batching: neutral)", forward(nets["gn"], batch=1), True),
        Variant("batch 4 + keep memory + channels_last_3d with InstanceNorm (dropped)", forward(nets["cl"]), True),
        Variant("medseg fp32 + channels_last_3d (dropped in fp32: drifts > 1e-4)", forward(nets["gn_cl"]), True),
    ]
    if native:
        variants += [
            Variant("medseg fp32 + bf16 autocast, NCDHW (training layout)", forward(nets["bf16_ncdhw"], bf16=True), True),
            Variant("medseg bf16 = medseg fp32 + bf16 autocast + channels_last_3d (kept where bf16 is native)",
                    forward(nets["bf16"], bf16=True), True),
        ]
    # fp32 conv3d ceiling (PERF_NOTES' probe): 32 -> 32 channels, 3^3 kernel, one 64^3 volume
    conv = torch.nn.Conv3d(32, 32, 3, padding=1).eval()
    conv_cl = copy.deepcopy(conv).to(memory_format=CL)
    volume = torch.randn(1, 32, 64, 64, 64)
    conv_flops = 2 * 32 * 32 * 27 * 64 ** 3

    def convolve(layer, x, times=4):
        def run():
            with torch.inference_mode():
                for _ in range(times):
                    layer(x)
        return run

    ceilings = [Variant("conv3d ceiling NCDHW", convolve(conv, volume), True),
                Variant("conv3d ceiling channels_last_3d", convolve(conv_cl, volume.contiguous(memory_format=CL)), True)]

    with torch.inference_mode():
        reference = network(windows)
    differences = {}
    for variant in variants[1:]:
        differences[variant.name] = float((variant.run() - reference).abs().max())
    flops = flops_per_window(network, patch)
    result = compare(variants + ceilings, repeats, per=4, flops=flops)
    for name in ("conv3d ceiling NCDHW", "conv3d ceiling channels_last_3d"):  # per run: 4 convolutions
        row = result[name]
        row.pop("speedup_wall"), row.pop("speedup_cpu")
        row["gflops_wall"] = conv_flops / row["wall_s_median"] / 1e9
        row["gflops_cpu"] = conv_flops / (row["cpu_s_median"] / torch.get_num_threads()) / 1e9
    for name, difference in differences.items():
        result[name]["max_abs_logit_difference_vs_plain"] = difference
    medseg_fp32 = result[variants[3].name]  # the row "= medseg fp32"
    ceiling = result["conv3d ceiling NCDHW"]
    ceiling_cl = result["conv3d ceiling channels_last_3d"]
    return {
        "what": "one batch of 4 windows (4 x 1 x 96 x 96 x 32) through the prostate DynUNet; times per window",
        "flops_per_window": flops, "flops_per_voxel": flops / (patch[0] * patch[1] * patch[2]),
        "variants": result,
        "fp32_fraction_of_conv3d_ceiling": {
            "medseg_fp32_vs_ncdhw_ceiling_cpu": medseg_fp32["gflops_cpu"] / ceiling["gflops_cpu"],
            "medseg_fp32_vs_ncdhw_ceiling_wall": medseg_fp32["gflops_wall"] / ceiling["gflops_wall"],
            "medseg_fp32_vs_channels_last_ceiling_cpu": medseg_fp32["gflops_cpu"] / ceiling_cl["gflops_cpu"],
            "plain_vs_ncdhw_ceiling_cpu": result[variants[0].name]["gflops_cpu"] / ceiling["gflops_cpu"],
        },
    }


def inference(repeats: int, shape: tuple[int, int, int]) -> dict:
    """Whole-volume sliding window: plain MONAI against medseg's `sliding_window_logits`."""
    from monai.inferers import sliding_window_inference

    network, task, plan = prostate_network()
    network.eval()
    roi, overlap, blending = plan.patch_size, task.inference.overlap, task.inference.blending
    torch.manual_seed(1)
    image = torch.randn(1, *shape)  # (C, X, Y, Z) preprocessed (z-scored) at model spacing
    outputs = {}

    def plain():
        with torch.inference_mode():
            outputs["plain"] = sliding_window_inference(image[None], roi, 1, network, overlap=overlap,
                                                        mode=blending)[0]

    def medseg(net, precision):
        def run():
            outputs[precision] = sliding_window_logits(net, image, roi, overlap, task.inference.sw_batch_size,
                                                       blending, CPU, precision)
        return run

    variants = [Variant("plain MONAI: sliding_window_inference(sw_batch_size=1), NCDHW, fp32, glibc default",
                        plain, False),
                Variant("medseg fp32 (--precision fp32)", medseg(prepared(network, "fp32"), "fp32"), True)]
    native = cpu_has_native_bf16()
    if native:
        variants.append(Variant("medseg bf16 (--precision auto on this CPU)", medseg(prepared(network, "bf16"), "bf16"),
                                True))
    windows = 1
    for size, r in zip(shape, roi):
        interval = max(int(r * (1 - overlap)), 1)
        windows *= -(-max(size - r, 0) // interval) + 1
    result = compare(variants, repeats, per=windows)
    fp32_difference = float((outputs["fp32"] - outputs["plain"]).abs().max())
    out = {
        "what": f"volume 1 x {' x '.join(map(str, shape))} at 1.5 x 1.5 x 3 mm, roi {roi}, overlap {overlap}, "
                f"{blending} blending, {windows} windows; times per window",
        "medseg_sw_batch_size": task.inference.sw_batch_size,
        "variants": result,
        "fp32_max_abs_difference_vs_plain": fp32_difference,
        "fp32_equal_within_1e-4": fp32_difference <= 1e-4,
    }
    if native:
        agree = (outputs["bf16"].argmax(0) == outputs["fp32"].argmax(0)).float().mean().item()
        out["bf16_argmax_agreement_untrained"] = agree
        out["bf16_note"] = ("random weights: this agreement says nothing about a trained model; run "
                            "benchmarks/bench_precision.py MODEL_DIR for the check that decides the default")
    return out


def training(repeats: int) -> dict:
    """One optimisation step: the plain MONAI loop against medseg's `train_one_epoch` (one step)."""
    import torchio as tio

    from medseg.train.steps import Progress, make_loss, train_one_epoch

    network, task, plan = prostate_network()
    batch = task.schedule.batch_size
    torch.manual_seed(2)
    image = torch.randn(batch, 1, *task.patch_size)
    label = torch.randint(0, task.num_classes, (batch, 1, *task.patch_size))
    one_step = dataclasses.replace(task, schedule=dataclasses.replace(task.schedule, steps_per_epoch=1))
    batches = itertools.repeat({"image": {tio.DATA: image}, "label": {tio.DATA: label}})

    def optimiser(net):
        o = task.optimizer
        return torch.optim.SGD(net.parameters(), lr=o.lr, momentum=o.momentum, nesterov=True,
                               weight_decay=o.weight_decay)

    plain_net = copy.deepcopy(network).train()
    plain_opt, plain_loss = optimiser(plain_net), make_loss(task, plan)

    def plain():
        output = plain_net(image)
        loss = plain_loss(list(torch.unbind(output, 1)), label)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain_net.parameters(), task.schedule.grad_clip)
        plain_opt.step()

    def medseg(precision, channels_last=None):
        net = prepared(network, precision, training=True, channels_last=channels_last)
        opt, loss_fn, progress = optimiser(net), make_loss(task, plan), Progress()

        def run():
            train_one_epoch(net, batches, loss_fn, opt, one_step, progress, lambda: 0.0, CPU, False, precision=precision)
        return run

    variants = [Variant("plain MONAI loop: NCDHW, InstanceNorm, fp32, glibc default", plain, False),
                Variant("medseg fp32 (--precision fp32)", medseg("fp32"), True),
                Variant("medseg fp32 + channels_last_3d (dropped)", medseg("fp32", channels_last=True), True)]
    if cpu_has_native_bf16():
        variants += [Variant("medseg bf16 (--precision auto on this CPU)", medseg("bf16"), True),
                     Variant("medseg bf16 + channels_last_3d (dropped)", medseg("bf16", channels_last=True), True)]
    return {
        "what": f"one SGD step, batch {batch} x 1 x {' x '.join(map(str, task.patch_size))}, DiceCE with deep "
                f"supervision, grad clip {task.schedule.grad_clip}; times per step",
        "variants": compare(variants, repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=["levers", "inference", "training"], required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (default: torch's, one per core)")
    parser.add_argument("--shape", type=int, nargs=3, default=[192, 192, 80],
                        help="inference volume (X Y Z voxels at model spacing)")
    parser.add_argument("--tag", default="", help="suffix of the results key, e.g. 'loaded' for a run on a busy machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start, load_at_start = time.perf_counter(), os.getloadavg()
    if args.section == "levers":
        section = levers(args.repeats)
    elif args.section == "inference":
        section = inference(args.repeats, tuple(args.shape))
    else:
        section = training(args.repeats)
    section["command"] = "python benchmarks/bench_speed.py " + " ".join(sys.argv[1:])
    section["machine"] = machine() | {"loadavg_at_start": load_at_start, "loadavg_at_end": os.getloadavg()}
    section["seconds"] = time.perf_counter() - start
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    key = f"threads_{args.threads}" + (f"_{args.tag}" if args.tag else "")
    results.setdefault(args.section, {})[key] = section
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(section, indent=2))


if __name__ == "__main__":
    main()
