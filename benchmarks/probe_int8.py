"""What the int8 check should ask, measured on a trained model's validation cases (issue 21).

Two probes, both against the f32 OpenVINO network on the cases `medseg quantize` checks:

- `bf16`: what the other precisions already do case by case (torch bf16, which `--precision auto` runs on
  a bf16 CPU; OpenVINO bf16; torch fp32): each organ's mean Dice change and its worst case. If the
  default itself moves single cases past 0.005, an every-case gate for int8 is stricter than the default.
- `calibration`: int8 quantised in memory from windows of 8, 16 or 32 training cases (and with full
  instead of fast bias correction), each checked the same way: how much the calibration set steadies it.

Prints JSON and writes it to `--out`. Needs `pip install "medseg[int8]"`.

    python benchmarks/probe_int8.py --model RUN [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from medseg.infer import quantize
from medseg.infer.backends import IR_NAME, OpenVINONetwork, compile_options
from medseg.infer.predictor import Predictor, load_model
from medseg.model.folder import read_run_config
from medseg.runtime import cpu_flags, cpu_name, keep_freed_memory

CALIBRATIONS = {"8 cases": (8, True), "16 cases": (16, True), "32 cases": (32, True), "8 cases, full bias correction": (8, False)}


def summary(verdict: dict) -> dict:
    """Per organ: mean change and worst case; worst agreement; both gates' readings."""
    organs = {organ: {"mean_dice_change": round(entry["dice_int8"] - entry["dice_fp32"], 4),
                      "worst_case_abs_change": round(entry["abs_dice_change"], 4), "worst_case": entry["worst_case"]}
              for organ, entry in verdict["organs"].items()}
    return {"organs": organs, "worst_agreement": verdict["agreement"]["worst"],
            "passes_per_organ_mean": verdict["passed"],
            "passes_every_case": verdict["passed"] and all(o["worst_case_abs_change"] <= quantize.MAX_DICE_CHANGE
                                                           for o in organs.values())}


def probe_bf16(folder: Path, fp32: Predictor, cases: list) -> dict:
    others = {"torch_bf16": ("torch", "bf16"), "openvino_bf16": ("openvino", "bf16"), "torch_fp32": ("torch", "fp32")}
    return {name: summary(quantize.verdict(quantize.check_cases(
                fp32, Predictor(load_model(folder, "cpu", precision=precision, backend=backend)), cases, echo=lambda _: None)))
            for name, (backend, precision) in others.items()}


def probe_calibration(folder: Path, fp32: Predictor, cases: list) -> dict:
    import openvino as ov

    config, entry, result = read_run_config(folder), fp32.bundle.network.cache, {}
    for name, (count, fast) in CALIBRATIONS.items():
        windows = quantize.calibration_windows(fp32, quantize.training_cases(folder, config, None, count))
        start = time.perf_counter()
        quantised, _ = quantize.quantize_network(entry / IR_NAME, windows, fast_bias_correction=fast)
        seconds = time.perf_counter() - start
        compiled = ov.Core().compile_model(quantised, "CPU", compile_options("f32"))
        int8 = Predictor(dataclasses.replace(fp32.bundle, network=OpenVINONetwork(compiled, "int8", None, False, 0.0)))
        result[name] = {"windows": len(windows), "quantise_seconds": round(seconds, 1),
                        **summary(quantize.verdict(quantize.check_cases(fp32, int8, cases, echo=lambda _: None)))}
        print(name, json.dumps(result[name]), file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="run folder of `medseg train`")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    fp32 = Predictor(load_model(args.model, "cpu", precision="fp32", backend="openvino"))
    cases = quantize.validation_cases(args.model, None, None)
    result = {"command": "python benchmarks/probe_int8.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "threads": args.threads},
              "against": "f32 OpenVINO", "cases": [c.name for c in cases],
              "bf16": probe_bf16(args.model, fp32, cases), "calibration": probe_calibration(args.model, fp32, cases)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
