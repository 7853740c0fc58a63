"""The DeepLab-style network against the task's default U-Net on a sample task, same CPU budget.

Each network trains with `medseg train --task T --max-minutes M --device cpu` on `--threads` CPU threads,
same seed and split, one after the other (`--side-by-side`: both at once, so that both see the same
machine load). The U-Net run uses the bundled task file as it is (prostate: DynUNet with deep
supervision; cells: MONAI's 2D UNet); the DeepLab run a copy with `network: {name: deeplab, filters: <the
same filters>}`. Each model then predicts the task's sample test cases (`medseg predict --no-overlays`)
and `medseg evaluate` scores them.

- `--task prostate` (default): the bundled sample data, four test scans; per-organ Dice and HD95.
- `--task cells`: `medseg sample-data --task cells --test-cases 8` written into `--work` first (16
  training fields, 8 test fields, seed 0); nucleus and cell Dice, and the nuclei as instances: detection
  F1 (IoU > 0.5, mean over fields and pooled), PQ and AJI.

Prints JSON and writes it to `--results` (default benchmarks/results/deeplab_<task>.json): the test
metrics, the measured seconds per training step (median of the first epoch, plan.json), steps done, the
run's wall clock (its `--max-minutes` clock), parameters, the prediction wall time, and the machine's
load average sampled while the networks trained.

    OMP_NUM_THREADS=1 python benchmarks/bench_deeplab.py [--task cells] [--minutes 4] [--threads 1] [--side-by-side]
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
NETWORKS = ("unet", "deeplab")
NOTE = ("Short budget on purpose: the machine is a shared 2-core one, so each run got a few wall-clock minutes on "
        "one thread while other work ran on the machine. These figures compare the early part of training "
        "under equal CPU time; they say nothing about where each network ends with a full budget.")
SIDE_BY_SIDE = (" Both trainings ran at once, one thread each, so both saw the same load (machine -> "
                "load_average_1min_while_training: above 2 on 2 cores means each got less than a whole core).")
SAMPLE_CELLS = ["--cases", "16", "--test-cases", "8", "--seed", "0"]  # the README's measured cells set


def sample_data(task: str, work: Path) -> Path:
    """The task's sample dataset: the bundled prostate phantoms, or cells written into `work`."""
    if task == "prostate":
        return ROOT / "sample_data" / "prostate"
    data = work / "data"
    if not (data / "labelsTs").is_dir():
        subprocess.run([sys.executable, "-m", "medseg", "sample-data", "--task", task, "--out", data, *SAMPLE_CELLS],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return data


def task_files(task: str, work: Path) -> dict[str, Path]:
    """The bundled task file, and a copy with the DeepLab-style network of the same filters."""
    bundled = ROOT / "pipelines" / f"{task}.yaml"
    settings = yaml.safe_load(bundled.read_text())
    settings["network"] = {"name": "deeplab", "filters": settings["network"]["filters"], "deep_supervision": False}
    deeplab = work / f"{task}_deeplab.yaml"
    deeplab.write_text(yaml.safe_dump(settings, sort_keys=False))
    return {"unet": bundled, "deeplab": deeplab}


def start(command: list, threads: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print("$ " + shlex.join(map(str, command)), flush=True)
    return subprocess.Popen(list(map(str, command)), cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def train(args, tasks: dict[str, Path], data: Path, work: Path) -> list[float]:
    """Both trainings (one after the other, or at once); returns the 1-minute load average every 10 s."""
    given = [] if args.task == "prostate" else ["--data", data]
    commands = {name: [sys.executable, "-m", "medseg", "train", "--task", tasks[name], *given, "--out",
                       work / name / "run", "--max-minutes", args.minutes, "--seed", 0, "--device", "cpu"]
                for name in NETWORKS}
    load = []
    for batch in [NETWORKS] if args.side_by_side else [(name,) for name in NETWORKS]:
        procs = {name: start(commands[name], args.threads, work / f"{name}_train.out") for name in batch}
        while any(proc.poll() is None for proc in procs.values()):
            load.append(os.getloadavg()[0])
            time.sleep(10)
        for name, proc in procs.items():
            if proc.returncode:
                raise SystemExit(f"error: {name} training failed; see {work / (name + '_train.out')}")
    return load


def predict_and_score(name: str, args, data: Path, work: Path) -> dict:
    """Prediction of the sample test cases with one model, and its metrics."""
    run, out = work / name / "run", work / name
    shutil.rmtree(out / "predictions", ignore_errors=True)
    shutil.rmtree(out / "evaluation", ignore_errors=True)
    helps = subprocess.run([sys.executable, "-m", "medseg", "predict", "--help"], capture_output=True, text=True,
                           check=True)
    backend = ["--backend", "torch"] if "--backend" in helps.stdout else []  # both networks on the same runtime
    began = time.perf_counter()
    predict = start([sys.executable, "-m", "medseg", "predict", data / "imagesTs", "--model", run, "--out",
                     out / "predictions", "--no-overlays", "--device", "cpu", *backend], args.threads,
                    out / "predict.out")
    if predict.wait():
        raise SystemExit(f"error: {name} prediction failed; see {out / 'predict.out'}")
    seconds = round(time.perf_counter() - began, 1)
    subprocess.run([sys.executable, "-m", "medseg", "evaluate", "--pred", out / "predictions", "--ref",
                    data / "labelsTs", "--task", args.task, "--out", out / "evaluation"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    organs = [organ for organ in summary if organ != "all"]
    dice = {organ: round(summary[organ]["dice"]["mean"], 4) for organ in organs}
    scores = {"test_dice": dice, "test_mean_dice": round(sum(dice.values()) / len(dice), 4),
              "test_hd95_mm": {organ: _round(summary[organ]["hd95_mm"]["mean"], 4) for organ in organs},
              "predict_seconds": seconds}
    instances = {organ: instance_scores(summary[organ]) for organ in organs if "instances_pooled" in summary[organ]}
    return {**scores, "instances": instances} if instances else scores


def instance_scores(organ: dict) -> dict:
    """Detection F1, PQ and AJI of one instance class: means over the test cases, and pooled."""
    pooled = organ["instances_pooled"]
    means = {key: _round(organ[key]["mean"], 4) for key in ("instance_f1", "instance_precision",
                                                            "instance_recall", "pq", "aji")}
    return {"mean_over_cases": means, "pooled": {key: _round(pooled[key], 4) for key in ("f1", "pq", "aji")},
            "objects": {key: pooled[key] for key in ("tp", "fp", "fn")}}


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


def machine(load: list[float]) -> dict:
    """Where it ran, and how busy the machine was while the networks trained."""
    import torch

    figures = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__}
    if load:
        figures["load_average_1min_while_training"] = {"mean": round(sum(load) / len(load), 2),
                                                       "min": round(min(load), 2), "max": round(max(load), 2),
                                                       "samples": len(load)}
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("prostate", "cells"), default="prostate", help="sample task to compare on")
    parser.add_argument("--minutes", type=float, default=4.0, help="wall-clock budget of each training run")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each run")
    parser.add_argument("--side-by-side", action="store_true", help="train both at once instead of in turn")
    parser.add_argument("--results", type=Path, help="default benchmarks/results/deeplab_<task>.json")
    parser.add_argument("--work", type=Path, help="default benchmarks/out/deeplab (prostate), deeplab_<task>")
    parser.add_argument("--score-only", action="store_true", help="predict and score the runs already in --work")
    args = parser.parse_args(argv)
    suffix = "" if args.task == "prostate" else f"_{args.task}"
    work = args.work or ROOT / "benchmarks" / "out" / f"deeplab{suffix}"
    results_path = args.results or ROOT / "benchmarks" / "results" / f"deeplab_{args.task}.json"
    command = shlex.join(["python", "benchmarks/bench_deeplab.py", *(sys.argv[1:] if argv is None else argv)])
    if os.environ.get("OMP_NUM_THREADS"):
        command = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} {command}"
    load = []
    if not args.score_only:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    data = sample_data(args.task, work)
    if not args.score_only:
        load = train(args, task_files(args.task, work), data, work)
    networks = {name: {**training_figures(work / name / "run"), **predict_and_score(name, args, data, work)}
                for name in NETWORKS}
    results = {"benchmark": f"deeplab vs U-Net, {args.task} sample task", "command": command,
               "note": NOTE + (SIDE_BY_SIDE if args.side_by_side else ""),
               "minutes_each": args.minutes, "threads_each": args.threads,
               "schedule": "side by side" if args.side_by_side else "one after the other",
               "machine": machine(load), "test_cases": len(list((data / "labelsTs").glob("*.nii.gz"))),
               "networks": networks}
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
