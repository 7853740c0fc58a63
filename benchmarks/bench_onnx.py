"""ONNX Runtime as a CPU backend for inference: does it beat medseg's PyTorch path? (Issue 9's lever.)

The prostate task's network (DynUNet 16..192, eval mode: main head only; seeded weights) is exported
to ONNX once and run on the same batches of `sw_batch_size` windows (96 x 96 x 32) as:

- torch fp32, prepared as medseg does (GroupNorm kernels, glibc keeping freed memory);
- torch bf16 autocast + channels_last_3d, medseg's default where the CPU has bf16 units;
- ONNX Runtime fp32, CPU execution provider, all graph optimisations, one thread per core.

Rounds are interleaved, medians of `--repeats`; outputs are compared with torch fp32. Needs
`pip install onnxruntime onnx onnxscript` (not a medseg dependency: it only becomes one if it wins).

    python benchmarks/bench_onnx.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from medseg.config import load_task
from medseg.model.networks import build_network, plan_network
from medseg.runtime import autocast, keep_freed_memory, prepare_network

RESULTS = Path(__file__).resolve().parent / "results" / "onnx.json"


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    keep_freed_memory()
    task = load_task("prostate")
    plan = plan_network(task.network, 1, task.num_classes, task.patch_size, task.spacing)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    fp32 = prepare_network(build_network(plan), cpu, "fp32").eval()
    bf16 = prepare_network(build_network(plan), cpu, "bf16").eval()
    bf16.load_state_dict(fp32.state_dict())
    batch = torch.randn(task.inference.sw_batch_size, 1, *task.patch_size)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "network.onnx"
        start = time.perf_counter()
        with torch.inference_mode():
            torch.onnx.export(fp32, (batch,), str(path), input_names=["image"], output_names=["logits"],
                              dynamo=True, optimize=True)
        export_s = time.perf_counter() - start
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def torch_fp32():
        with torch.inference_mode():
            return fp32(batch)

    def torch_bf16():
        with torch.inference_mode(), autocast(cpu, "bf16"):
            return bf16(batch.contiguous(memory_format=torch.channels_last_3d)).float()

    def onnxruntime_fp32():
        return torch.from_numpy(session.run(None, {"image": batch.numpy()})[0])

    ways = {"torch_fp32_medseg": torch_fp32, "torch_bf16_medseg_default": torch_bf16,
            "onnxruntime_fp32": onnxruntime_fp32}
    times = {name: [] for name in ways}
    outputs = {name: run() for name, run in ways.items()}  # warm-up
    for _ in range(args.repeats):
        for name, run in ways.items():
            start = time.perf_counter()
            outputs[name] = run()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    reference = outputs["torch_fp32_medseg"]
    result = {
        "what": f"forward of {batch.shape[0]} windows {list(task.patch_size)}, {plan.name} {list(plan.filters)}",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "onnxruntime": ort.__version__, "threads": torch.get_num_threads()},
        "command": "python benchmarks/bench_onnx.py " + " ".join(sys.argv[1:]),
        "export_s": round(export_s, 1), "repeats": args.repeats,
        "seconds_per_window_median": {n: round(t / batch.shape[0], 4) for n, t in median.items()},
        "onnxruntime_over_torch_fp32": round(median["onnxruntime_fp32"] / median["torch_fp32_medseg"], 3),
        "onnxruntime_over_torch_bf16": round(median["onnxruntime_fp32"] / median["torch_bf16_medseg_default"], 3),
        "max_abs_difference_vs_torch_fp32": {n: round(float((o - reference).abs().max()), 6) for n, o in outputs.items()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
