"""The DeepLab-style network against the default U-Net on the prostate sample task, same CPU budget.

Each network trains with `medseg train --task prostate --max-minutes M --device cpu` on `--threads` CPU
threads, same seed and split, one after the other (`--side-by-side`: both at once, so that both see the
same machine load). The U-Net run uses the bundled task file as it is (DynUNet, deep supervision); the
DeepLab run a copy with `network: {name: deeplab, filters: <the same filters>}`. Each model then
predicts the four sample test scans (`medseg predict --no-overlays`) and `medseg evaluate` scores them.

Prints JSON and writes it to `--results` (default benchmarks/results/deeplab_prostate.json): per-organ
test Dice and HD95, the measured seconds per training step (median of the first epoch, plan.json),
steps done, the run's wall clock (its `--max-minutes` clock), parameters, and the prediction wall time.

    OMP_NUM_THREADS=1 python benchmarks/bench_deeplab.py [--minutes 4] [--threads 1] [--side-by-side]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "prostate"
NETWORKS = ("unet", "deeplab")
NOTE = ("Short budget on purpose: the machine is a shared 2-core one, so each run got a few wall-clock minutes on "
        "one thread while other work ran on the other core. These figures compare the early part of training "
        "under equal CPU time; they say nothing about where each network ends with a full budget.")


def task_files(work: Path) -> dict[str, Path]:
    """The bundled prostate task, and a copy with the DeepLab-style network of the same filters."""
    settings = yaml.safe_load((ROOT / "pipelines" / "prostate.yaml").read_text())
    settings["network"] = {"name": "deeplab", "filters": settings["network"]["filters"], "deep_supervision": False}
    deeplab = work / "prostate_deeplab.yaml"
    deeplab.write_text(yaml.safe_dump(settings, sort_keys=False))
    return {"unet": ROOT / "pipelines" / "prostate.yaml", "deeplab": deeplab}


def start(command: list, threads: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print("$ " + shlex.join(map(str, command)), flush=True)
    return subprocess.Popen(list(map(str, command)), cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def train(args, tasks: dict[str, Path], work: Path) -> None:
    """Both trainings (one after the other, or at once)."""
    commands = {name: [sys.executable, "-m", "medseg", "train", "--task", tasks[name], "--out", work / name / "run",
                       "--max-minutes", args.minutes, "--seed", 0, "--device", "cpu"] for name in NETWORKS}
    for batch in [NETWORKS] if args.side_by_side else [(name,) for name in NETWORKS]:
        procs = {name: start(commands[name], args.threads, work / f"{name}_train.out") for name in batch}
        for name, proc in procs.items():
            if proc.wait():
                raise SystemExit(f"error: {name} training failed; see {work / (name + '_train.out')}")


def predict_and_score(name: str, args, work: Path) -> dict:
    """Prediction of the sample test scans with one model, and its per-organ metrics."""
    run, out = work / name / "run", work / name
    shutil.rmtree(out / "predictions", ignore_errors=True)
    shutil.rmtree(out / "evaluation", ignore_errors=True)
    helps = subprocess.run([sys.executable, "-m", "medseg", "predict", "--help"], capture_output=True, text=True,
                           check=True)
    backend = ["--backend", "torch"] if "--backend" in helps.stdout else []  # both networks on the same runtime
    began = time.perf_counter()
    predict = start([sys.executable, "-m", "medseg", "predict", SAMPLE / "imagesTs", "--model", run, "--out",
                     out / "predictions", "--no-overlays", "--device", "cpu", *backend], args.threads,
                    out / "predict.out")
    if predict.wait():
        raise SystemExit(f"error: {name} prediction failed; see {out / 'predict.out'}")
    seconds = round(time.perf_counter() - began, 1)
    subprocess.run([sys.executable, "-m", "medseg", "evaluate", "--pred", out / "predictions", "--ref",
                    SAMPLE / "labelsTs", "--task", "prostate", "--out", out / "evaluation"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    organs = [organ for organ in summary if organ != "all"]
    dice = {organ: round(summary[organ]["dice"]["mean"], 4) for organ in organs}
    return {"test_dice": dice, "test_mean_dice": round(sum(dice.values()) / len(dice), 4),
            "test_hd95_mm": {organ: _round(summary[organ]["hd95_mm"]["mean"], 2) for organ in organs},
            "predict_seconds_4_scans": seconds}


def _round(value, digits):
    return None if value is None else round(value, digits)


def training_figures(run: Path) -> dict:
    """Step time, steps, wall clock, validation Dice and the network's size, from the run folder."""
    import torch

    from medseg.model.folder import read_run_config
    from medseg.model.networks import build_network

    plan = json.loads((run / "plan.json").read_text())
    with (run / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    config = read_run_config(run)
    network = build_network(config.network)
    validated = [float(r["mean_dice"]) for r in rows if r.get("mean_dice")]
    return {"network": config.network.name, "filters": list(config.network.filters),
            "deep_supervision": config.network.deep_supervision,
            "parameters": sum(p.numel() for p in network.parameters()),
            "step_seconds_median_first_epoch": round(plan["step_seconds"], 3),
            "step_seconds_mean": round(sum(float(r["step_seconds"]) for r in rows) / max(int(rows[-1]["step"]), 1), 3),
            "steps_done": int(rows[-1]["step"]), "preprocessing_seconds": plan["preprocessing_seconds"],
            "precision": plan["precision"], "best_validation_dice": round(max(validated), 4) if validated else None,
            "train_wall_seconds": round(torch.load(run / "last.pt", weights_only=True)["progress"]["wall_seconds"], 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="wall-clock budget of each training run")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each run")
    parser.add_argument("--side-by-side", action="store_true", help="train both at once instead of in turn")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "deeplab_prostate.json")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "deeplab")
    parser.add_argument("--score-only", action="store_true", help="predict and score the runs already in --work")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "benchmarks/bench_deeplab.py", *(sys.argv[1:] if argv is None else argv)])
    if not args.score_only:
        shutil.rmtree(args.work, ignore_errors=True)
        args.work.mkdir(parents=True)
        train(args, task_files(args.work), args.work)
    networks = {name: {**training_figures(args.work / name / "run"), **predict_and_score(name, args, args.work)}
                for name in NETWORKS}
    import torch

    results = {"benchmark": "deeplab vs U-Net, prostate sample task", "command": command, "note": NOTE,
               "minutes_each": args.minutes, "threads_each": args.threads,
               "schedule": "side by side" if args.side_by_side else "one after the other",
               "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
               "test_cases": len(list((SAMPLE / "labelsTs").glob("*.nii.gz"))), "networks": networks}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
