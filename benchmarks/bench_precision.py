"""fp32 against bf16 on a trained model: label agreement and Dice on the test cases.

bf16 autocast may stay the default on CPUs with native bf16 (`--precision auto`) only if, on every
case, `medseg predict`'s labels in bf16 agree with fp32's on >= 99.9% of voxels and no organ's Dice
moves by more than 0.005. This script runs both precisions through `medseg.infer.Predictor` (the
code `medseg predict` runs) on a dataset's test cases (imagesTs + labelsTs; default: the model task's
bundled sample data), prints JSON with a verdict and writes it to benchmarks/results/precision.json.

    python benchmarks/bench_precision.py MODEL_DIR [--data DATASET] [--device cpu] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from medseg.config import sample_data_dir
from medseg.data.datasets import load_dataset
from medseg.infer.predictor import Predictor, load_model
from medseg.io import read_image, read_label
from medseg.evaluate.metrics import confusion, dice
from medseg.runtime import cpu_has_native_bf16, keep_freed_memory

MIN_AGREEMENT = 0.999  # fraction of voxels with the same label
MAX_DICE_CHANGE = 0.005  # per organ and case
RESULTS = Path(__file__).resolve().parent / "results" / "precision.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def dice_per_organ(reference: np.ndarray, predicted: np.ndarray, organs: dict[int, str]) -> dict[str, float]:
    """Dice per organ; NaN where the organ is absent from both masks."""
    return {name: dice(*confusion(reference == i, predicted == i)[:3]) for i, name in organs.items()}


def compare_case(image, reference: np.ndarray | None, fp32: Predictor, bf16: Predictor) -> dict:
    """Both precisions on one scan: agreement of the final labels (input grid), Dice, seconds."""
    organs = fp32.task.label_names
    start = time.perf_counter()
    seg32 = fp32.predict(image)
    middle = time.perf_counter()
    seg16 = bf16.predict(image)
    end = time.perf_counter()
    a, b = seg32.labels, seg16.labels
    either = (a > 0) | (b > 0)
    row = {
        "voxels": int(a.size),
        "agreement": float(np.mean(a == b)),
        "foreground_agreement": float(np.mean(a[either] == b[either])) if either.any() else 1.0,
        "inference_seconds": {"fp32": seg32.seconds["inference"], "bf16": seg16.seconds["inference"]},
        "predict_seconds": {"fp32": middle - start, "bf16": end - middle},
    }
    if reference is not None:
        d32, d16 = dice_per_organ(reference, a, organs), dice_per_organ(reference, b, organs)
        row["dice_fp32"], row["dice_bf16"] = d32, d16
        row["dice_change"] = {k: d16[k] - d32[k] for k in organs.values() if not math.isnan(d16[k] - d32[k])}
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="model folder from `medseg train`")
    parser.add_argument("--data", type=Path, help="dataset with imagesTs (+ labelsTs); default: the task's sample data")
    parser.add_argument("--device", default="cpu", help="cpu (the question this answers) or cuda")
    parser.add_argument("--checkpoint", default="best", help="best or last")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON file to write")
    args = parser.parse_args()
    keep_freed_memory()  # as `medseg predict` does

    fp32 = Predictor(load_model(args.model, args.device, args.checkpoint, precision="fp32"))
    bf16 = Predictor(load_model(args.model, args.device, args.checkpoint, precision="bf16"))
    task = fp32.task
    data = args.data or sample_data_dir(task.sample_data)
    cases = load_dataset(data, "test")
    if not cases:
        print(f"error: {data} has no test cases (imagesTs/)", file=sys.stderr)
        return 2
    rows = {}
    for case in cases:
        reference = read_label(case.label)[0] if case.label is not None else None
        rows[case.name] = compare_case(read_image(case.images), reference, fp32, bf16)
        print(f"{case.name}: agreement {rows[case.name]['agreement']:.5f}", file=sys.stderr, flush=True)

    worst_agreement = min(r["agreement"] for r in rows.values())
    changes = [abs(v) for r in rows.values() for v in r.get("dice_change", {}).values()]
    worst_change = max(changes) if changes else None
    mean_change = {organ: float(np.mean([r["dice_change"][organ] for r in rows.values()
                                         if organ in r.get("dice_change", {})]))
                   for organ in task.label_names.values()
                   if any(organ in r.get("dice_change", {}) for r in rows.values())}
    speed = [r["inference_seconds"]["fp32"] / r["inference_seconds"]["bf16"] for r in rows.values()]
    passed = worst_agreement >= MIN_AGREEMENT and (worst_change is None or worst_change <= MAX_DICE_CHANGE)
    result = {
        "model": str(args.model.resolve()), "data": str(Path(data).resolve()), "device": args.device,
        "cpu_native_bf16": cpu_has_native_bf16(), "machine": cpu_model(),
        "loadavg": os.getloadavg(),
        "criteria": {"min_agreement": MIN_AGREEMENT, "max_abs_dice_change": MAX_DICE_CHANGE},
        "worst_agreement": worst_agreement, "worst_abs_dice_change": worst_change, "mean_dice_change": mean_change,
        "bf16_inference_speedup_median": float(np.median(speed)),
        "verdict": ("pass: bf16 may stay the default on native-bf16 CPUs" if passed
                    else "fail: make fp32 the default (medseg.runtime.resolve_precision)"),
        "cases": rows,
        "command": "python benchmarks/bench_precision.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
