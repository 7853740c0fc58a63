"""Training speed and quality of `medseg train --task prostate` on the bundled sample data.

Two parts, each printing JSON and writing it under benchmarks/results/:

- `steps` (a couple of minutes): seconds per optimisation step, patch voxels per second, and the share
  of step time spent waiting for the TorchIO queue, with the task's default settings. The pipeline is
  medseg's own (`load_subject`, `patch_batches`, `build_network`, `make_loss`, the same step code);
  data time and compute time are clocked separately.
- `quality` (about 15 minutes): the README's `medseg train --task prostate` exactly as a user runs it,
  then `medseg predict` and `medseg evaluate` on the four sample test cases; per-organ Dice, wall time.

- `precision` (2 x `--minutes` plus validation): bf16 autocast against fp32 for the same wall-clock
  budget: `medseg train --task prostate --max-minutes M --precision P`, same seed and split; the
  trainer's validation Dice after the budget, steps done, and validation Dice at the last step both
  reached (equal work).

    python benchmarks/bench_train.py steps [--steps 30]
    python benchmarks/bench_train.py quality [--out benchmarks/out/quality]
    python benchmarks/bench_train.py precision [--minutes 6] [--out benchmarks/out/precision]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def bench_steps(steps: int, warmup: int = 3) -> dict:
    import torch

    from medseg.config import load_task, sample_data_dir
    from medseg.data.datasets import load_dataset
    from medseg.data.fingerprint import compute_fingerprint
    from medseg.model.networks import build_network, plan_network
    from medseg.data.preprocess import resolve_preprocessing
    from medseg.runtime import keep_freed_memory, prepare_network, resolve_precision
    from medseg.data.patches import load_subject, patch_batches
    from medseg.train.steps import make_loss, make_optimizer, train_step

    task = load_task("prostate")
    cases = load_dataset(sample_data_dir("prostate"))
    prep = resolve_preprocessing(task, compute_fingerprint(cases, task))
    plan = plan_network(task.network, 1, task.num_classes, task.patch_size, prep.spacing)
    device = torch.device("cpu")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        subjects = [load_subject(case, prep, task, Path(cache)) for case in cases]
        preprocess_s = time.perf_counter() - start
    keep_freed_memory()  # as the CLI does at start-up
    precision = resolve_precision("auto", device)
    network = prepare_network(build_network(plan), device, precision, training=True)
    optimizer = make_optimizer(task, network)
    loss_fn = make_loss(task, plan)
    batches = patch_batches(subjects, task, device)
    network.train()
    data_s, compute_s = [], []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        train_step(network, batch, loss_fn, optimizer, task, device, precision)
        t2 = time.perf_counter()
        if step >= warmup:
            data_s.append(t1 - t0)
            compute_s.append(t2 - t1)
    step_s = np.add(data_s, compute_s)
    voxels = task.schedule.batch_size * int(np.prod(task.patch_size))
    return {
        "what": "medseg train step on the prostate task defaults (TorchIO Queue + LabelSampler + augmentation, "
                f"{plan.name} {list(plan.filters)}, patch {list(task.patch_size)}, batch {task.schedule.batch_size}, "
                f"num_workers {task.sampling.num_workers}, precision {precision})",
        "steps_timed": steps,
        "preprocess_all_cases_s": round(preprocess_s, 2),
        "seconds_per_step_median": round(float(np.median(step_s)), 4),
        "seconds_per_step_mean": round(float(np.mean(step_s)), 4),
        "data_wait_s_mean": round(float(np.mean(data_s)), 4),
        "data_wait_share": round(float(np.sum(data_s) / np.sum(step_s)), 4),
        "voxels_per_s": round(voxels / float(np.mean(step_s))),
        "patches_per_s": round(task.schedule.batch_size / float(np.mean(step_s)), 2),
    }


def bench_quality(out: Path) -> dict:
    """The README's command as a user runs it, then predict + evaluate on the sample test cases."""
    from medseg.config import sample_data_dir

    data = sample_data_dir("prostate")
    run, predictions, evaluation = out / "run", out / "predictions", out / "evaluation"
    medseg = [sys.executable, "-m", "medseg"]
    commands = [
        [*medseg, "train", "--task", "prostate", "--out", str(run)],
        [*medseg, "predict", str(data / "imagesTs"), "-m", str(run), "-o", str(predictions), "--no-overlays"],
        [*medseg, "evaluate", "--pred", str(predictions), "--ref", str(data / "labelsTs"), "--task", "prostate",
         "-o", str(evaluation)],
    ]
    seconds = []
    for command in commands:
        start = time.perf_counter()
        subprocess.run(command, check=True)
        seconds.append(round(time.perf_counter() - start, 1))
    summary = json.loads((evaluation / "summary.json").read_text())
    organs = [o for o in summary if o != "all"]
    dice = {o: round(summary[o]["dice"]["mean"], 4) for o in organs}
    log = (run / "train.log").read_text().strip().splitlines()
    return {
        "commands": [" ".join(c).replace(sys.executable, "python") for c in commands],
        "train_seconds": seconds[0], "predict_seconds": seconds[1], "evaluate_seconds": seconds[2],
        "epochs_done": sum(1 for line in log if " epoch " in f" {line} " and "step" in line),
        "test_dice": dice,
        "test_mean_dice": round(float(np.mean(list(dice.values()))), 4),
        "test_hd95_mm": {o: round(summary[o]["hd95_mm"]["mean"], 2) for o in organs
                         if summary[o]["hd95_mm"]["mean"] is not None},
        "train_log_tail": log[-3:],
    }


def _validation(run: Path) -> list[tuple[int, float]]:
    """(step, mean validation Dice) of every validation in a run folder's metrics.csv."""
    import csv

    with open(run / "metrics.csv", newline="") as file:
        return [(int(row["step"]), float(row["mean_dice"])) for row in csv.DictReader(file) if row.get("mean_dice")]


def bench_precision(out: Path, minutes: float) -> dict:
    """bf16 vs fp32 training, same budget, same seed: the validation Dice each reaches."""
    import shutil

    result: dict = {"budget_minutes": minutes, "runs": {}}
    for precision in ("bf16", "fp32"):
        run = out / precision
        shutil.rmtree(run, ignore_errors=True)
        command = [sys.executable, "-m", "medseg", "train", "--task", "prostate", "--out", str(run),
                   "--max-minutes", str(minutes), "--precision", precision]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        curve = _validation(run)
        log = (run / "train.log").read_text().strip().splitlines()
        result["runs"][precision] = {
            "command": " ".join(command).replace(sys.executable, "python"),
            "wall_s": round(time.perf_counter() - start, 1), "validation_curve": curve,
            "final_validation_dice": curve[-1][1] if curve else None,
            "best_validation_dice": max((d for _, d in curve), default=None), "train_log_tail": log[-2:]}
    bf16, fp32 = (dict(result["runs"][p]["validation_curve"]) for p in ("bf16", "fp32"))
    shared = sorted(set(bf16) & set(fp32))
    if shared:
        result["equal_steps"] = {"step": shared[-1], "bf16": bf16[shared[-1]], "fp32": fp32[shared[-1]]}
    result["bf16_final_minus_fp32_final"] = round(result["runs"]["bf16"]["final_validation_dice"]
                                                  - result["runs"]["fp32"]["final_validation_dice"], 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["steps", "quality", "precision"])
    parser.add_argument("--minutes", type=float, default=6.0, help="precision: training budget of each run")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, help="scratch folder (default benchmarks/out/<part>)")
    args = parser.parse_args()
    result = {"benchmark": f"train/{args.part}", "machine": machine(),
              "command": "python benchmarks/bench_train.py " + " ".join(sys.argv[1:])}
    out = args.out or Path("benchmarks/out") / args.part
    if args.part == "steps":
        result.update(bench_steps(args.steps))
    elif args.part == "quality":
        result.update(bench_quality(out))
    else:
        result.update(bench_precision(out, args.minutes))
    text = json.dumps(result, indent=2)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"train_{args.part}.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
