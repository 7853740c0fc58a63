"""Real-data quality benchmark: head-and-neck organs at risk on OpenKBP CT, partially labelled.

Split (fixed): the dataset's 203 training cases sorted by name; the first 170 (hn_001 .. hn_200 in
the current data) are for training, the last 33 (hn_201 .. hn_239) are held out and never seen in
training. The held-out set has more esophagus (12) and larynx (17) cases than a seeded shuffle gave
(10, 9), the two organs with the fewest contours. The
trainer gets a dataset view listing only the 170 (links to the real files) and, for its own model
selection, holds out 5 of them (`--folds 34 --fold 0 --seed 0`), so the 33 are touched only by the
final `medseg predict` and `medseg evaluate`.

Budget: `--minutes` of training steps (default 60; validation and preprocessing are not counted);
the learning-rate schedule is stretched to fit it. Then `medseg predict` on the held-out images and
`medseg evaluate --ref <dataset folder>`, which skips each organ a case did not contour.

Writes to `--results` (default benchmarks/results/headneck/): results.json and results.md (per organ:
Dice, HD95, surface Dice at 2 mm; mean, std, n over contoured cases), metrics.csv (every case x
organ x metric), training_curve.png and training_metrics.csv, train.log, split.json and command.txt.
Scratch (preprocessed cache, model, predictions) goes to `--work`, replaced on every run.

    python benchmarks/bench_headneck.py [--minutes 60] [--val-cases 33] [--device auto] [--uniform-cases]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "openkbp-hn"
N_TRAIN = 170  # first cases by sorted name; the rest (33) are the benchmark's held-out cases
INTERNAL_FOLDS = 34  # the trainer's own validation: 170 / 34 = 5 of the training cases
TASK = "headneck"
METRICS = (("dice", "Dice"), ("hd95_mm", "HD95 mm"), ("surface_dice", "surface Dice @2 mm"))


def split_cases(data: Path) -> tuple[list[str], list[str], dict]:
    """(training names, held-out names, the dataset.json) of the fixed split."""
    from medseg.data.datasets import load_dataset

    meta = json.loads((data / "dataset.json").read_text())
    names = sorted(case.name for case in load_dataset(data))
    return names[:N_TRAIN], names[N_TRAIN:], meta


def write_view(data: Path, meta: dict, train: list[str], folder: Path) -> Path:
    """A dataset folder listing only the training cases; imagesTr/ and labelsTr/ link to the real ones."""
    folder.mkdir(parents=True)
    for sub in ("imagesTr", "labelsTr"):
        os.symlink((data / sub).resolve(), folder / sub, target_is_directory=True)
    keep = set(train)
    entries = [e for e in meta["training"] if Path(e["image"]).name.removesuffix(".nii.gz") in keep]
    view = {**meta, "training": entries, "numTraining": len(entries), "test": [], "numTest": 0}
    (folder / "dataset.json").write_text(json.dumps(view, indent=1))
    return folder


def medseg(*args: str | Path) -> float:
    """Run a `medseg` command (output streams through); returns its wall time in seconds."""
    command = [sys.executable, "-m", "medseg", *map(str, args)]
    print("$ " + shlex.join(command[2:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.perf_counter() - start


def organ_table(summary: dict) -> dict:
    """organ -> metric -> {mean, std, n} from `medseg evaluate`'s summary.json."""
    table = {}
    for organ, metrics in summary.items():
        if organ == "all":
            continue
        table[organ] = {key: {k: metrics[key][k] for k in ("mean", "std", "n", "n_empty", "n_inf")}
                        for key, _ in METRICS}
    return table


def markdown(table: dict, header: str) -> str:
    def cell(stats: dict, digits: int) -> str:
        if stats["mean"] is None:
            return "-"
        std = f" ± {stats['std']:.{digits}f}" if stats["std"] is not None else ""
        return f"{stats['mean']:.{digits}f}{std}"

    lines = [header, "", "| organ | n | " + " | ".join(name for _, name in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for organ, row in table.items():
        digits = {"dice": 3, "hd95_mm": 1, "surface_dice": 3}
        lines.append(f"| {organ} | {row['dice']['n']} | "
                     + " | ".join(cell(row[key], digits[key]) for key, _ in METRICS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the openkbp-hn dataset folder")
    parser.add_argument("--minutes", type=float, default=60.0, help="training budget in minutes of steps")
    parser.add_argument("--val-cases", type=int, default=None, help="evaluate only the first N held-out cases "
                        "(smoke tests); default all")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--uniform-cases", action="store_true", help="ablation: the task with "
                        "sampling.balance_contoured off (cases drawn uniformly)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "headneck")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "headneck",
                        help="scratch folder, replaced on every run")
    args = parser.parse_args(argv)
    command = shlex.join(["python", *([Path(sys.argv[0]).resolve().relative_to(ROOT).as_posix()]
                                       if Path(sys.argv[0]).resolve().is_relative_to(ROOT) else sys.argv[:1]),
                          *(sys.argv[1:] if argv is None else argv)])

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    data = args.data.resolve()
    if not (data / "dataset.json").is_file():
        raise SystemExit(f"error: {data} is not the openkbp-hn dataset folder (no dataset.json); pass --data")
    train, held_out, meta = split_cases(data)
    evaluated = held_out[: args.val_cases] if args.val_cases else held_out
    if args.work.exists():
        shutil.rmtree(args.work)
    view = write_view(data, meta, train, args.work / "train_data")
    task = TASK
    if args.uniform_cases:
        import yaml

        from medseg.config import pipelines_dirs

        settings = yaml.safe_load((pipelines_dirs()[0] / f"{TASK}.yaml").read_text())
        settings["sampling"]["balance_contoured"] = False
        task = args.work / f"{TASK}_uniform_cases.yaml"
        task.write_text(yaml.safe_dump(settings, sort_keys=False))
    run, predictions, evaluation = args.work / "run", args.work / "predictions", args.work / "evaluation"

    seconds = {"train": medseg("train", "--task", task, "--data", view, "--out", run, "--max-minutes", args.minutes,
                               "--folds", INTERNAL_FOLDS, "--fold", 0, "--seed", 0, "--device", device)}
    images = [data / "imagesTr" / f"{name}.nii.gz" for name in evaluated]
    seconds["predict"] = medseg("predict", *images, "--model", run, "--out", predictions, "--no-overlays",
                                "--device", device)
    masks = args.work / "masks"  # only the label maps: predict also writes 3D Slicer .seg.nrrd copies
    masks.mkdir()
    for name in evaluated:
        os.symlink((predictions / f"{name}_seg.nii.gz").resolve(), masks / f"{name}_seg.nii.gz")
    seconds["evaluate"] = medseg("evaluate", "--pred", masks, "--ref", data, "--task", task, "--out", evaluation)

    args.results.mkdir(parents=True, exist_ok=True)
    summary = json.loads((evaluation / "summary.json").read_text())
    table = organ_table(summary)
    config = json.loads((run / "config.json").read_text())
    training = [line for line in (run / "train.log").read_text().splitlines() if " step " in line]
    results = {
        "command": command,
        "split": f"sorted case names: first {N_TRAIN} train, last {len(held_out)} held out "
                 f"({len(evaluated)} evaluated); trainer's own validation: "
                 f"--folds {INTERNAL_FOLDS} --fold 0 --seed 0",
        "budget_minutes": args.minutes,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "device": device},
        "preprocessing": config["preprocessing"],
        "network": config["network"],
        "last_epoch": training[-1] if training else None,
        "organs": table,
    }
    (args.results / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    header = (f"Head and neck, {len(evaluated)} held-out cases (contoured organs only), {args.minutes:g} min of "
              f"training on {device} ({os.cpu_count()} CPUs). Command: `{command}`")
    (args.results / "results.md").write_text(markdown(table, header))
    (args.results / "command.txt").write_text(command + "\n")
    (args.results / "split.json").write_text(json.dumps({"train": train, "held_out": held_out,
                                                         "evaluated": evaluated}, indent=1) + "\n")
    shutil.copy(evaluation / "metrics.csv", args.results / "metrics.csv")
    shutil.copy(run / "metrics.csv", args.results / "training_metrics.csv")
    shutil.copy(run / "train.log", args.results / "train.log")
    if (run / "training_curve.png").is_file():
        shutil.copy(run / "training_curve.png", args.results / "training_curve.png")
    print(markdown(table, header))
    print(f"results in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
