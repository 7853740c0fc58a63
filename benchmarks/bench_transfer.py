"""Transfer learning on real CT: fine-tune a head-and-neck model on 20 new cases vs train from scratch on them.

A clinic with a few contoured cases of its own has a model trained elsewhere. Split (fixed, from
`bench_headneck.py`): the pretrained model has seen only the first 170 cases by sorted name; of the 33
others, the first 20 are the clinic's training cases and the last 13 are held out and only scored.
Both runs train at once, each on `--threads` CPU threads, under the same wall-clock `--minutes`, with
the task's settings; one starts from the pretrained weights (`medseg train --init-weights MODEL`), the
other from random weights. Both then predict the 13 held-out scans and `medseg evaluate` scores the
contoured organs.

    python benchmarks/bench_transfer.py --pretrained RUN_FOLDER [--minutes 10] [--threads 1]
        [--freeze-encoder-epochs N]

Writes results.json and results.md to `--results` (default benchmarks/results/transfer-headneck/).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from bench_headneck import DEFAULT_DATA, METRICS, ROOT, TASK, evaluate, split_cases, start, write_view

N_CLINIC = 20  # of the 33 cases the pretrained model never saw: the clinic's own training cases
CLINIC_FOLDS = 10  # medseg's own validation: 2 of the 20


def train_pair(args, view: Path, work: Path) -> dict:
    """Fine-tuned and from-scratch runs at once; returns their wall seconds."""
    runs = {"fine-tuned": ["--init-weights", args.pretrained,
                           *(["--freeze-encoder-epochs", args.freeze_encoder_epochs] if args.freeze_encoder_epochs else [])],
            "from scratch": []}
    procs, began = {}, time.perf_counter()
    for name, extra in runs.items():
        folder = work / name.replace(" ", "_")
        procs[name] = start([sys.executable, "-m", "medseg", "train", "--task", TASK, "--data", view, "--out", folder,
                             "--max-minutes", args.minutes, "--folds", CLINIC_FOLDS, "--fold", 0, "--seed", 0,
                             "--device", "cpu", "--precision", args.precision, *extra],
                            args.threads, work / f"{folder.name}_train.out")
    wall = {}
    for name, proc in procs.items():
        if proc.wait():
            raise SystemExit(f"error: the {name} run failed (exit {proc.returncode}); see {work}/*_train.out")
        wall[name] = round(time.perf_counter() - began, 1)
    return wall


def predict(folder: Path, held_out: list[str], args) -> Path:
    images = [args.data / "imagesTr" / f"{name}.nii.gz" for name in held_out]
    out = folder / "predictions"
    command = [sys.executable, "-m", "medseg", "predict", *images, "--model", folder, "--out", out, "--no-overlays"]
    proc = start(command, args.threads, folder.parent / f"{folder.name}_predict.out")
    if proc.wait():
        raise SystemExit(f"error: prediction with {folder} failed; see {folder.parent}/{folder.name}_predict.out")
    return out


def markdown(results: dict) -> str:
    organs = list(results["organs"]["from scratch"])
    lines = [f"Head and neck, fine-tuning on {results['clinic_cases']} cases vs training from scratch on them, "
             f"{results['minutes']:g} wall-clock minutes each, {results['threads']} thread(s) each; "
             f"{results['held_out']} held-out cases (contoured organs only). Command: `{results['command']}`", ""]
    for key, title in METRICS:
        lines += [f"**{title}** (mean over held-out cases)", "", "| organ | from scratch | fine-tuned |", "|---|---|---|"]
        for organ in organs:
            cells = [results["organs"][run][organ][key]["mean"] for run in ("from scratch", "fine-tuned")]
            lines.append(f"| {organ} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", type=Path, required=True,
                        help="a headneck run folder trained on the first 170 cases only (e.g. bench_headneck.py's)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the openkbp-hn dataset folder")
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of each run")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each run (both run at once)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--freeze-encoder-epochs", type=int, default=0, help="keep the encoder frozen this long")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "transfer-headneck")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "transfer")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "benchmarks/bench_transfer.py", *(sys.argv[1:] if argv is None else argv)])
    args.data, args.pretrained = args.data.resolve(), args.pretrained.resolve()
    _, unseen, meta = split_cases(args.data)
    clinic, held_out = unseen[:N_CLINIC], unseen[N_CLINIC:]
    if args.work.exists():
        shutil.rmtree(args.work)
    view = write_view(args.data, meta, clinic, args.work / "clinic_data")
    wall = train_pair(args, view, args.work)
    organs = {}
    for name in ("from scratch", "fine-tuned"):
        folder = args.work / name.replace(" ", "_")
        organs[name] = evaluate(predict(folder, held_out, args), held_out, args, folder)
    results = {"command": command, "minutes": args.minutes, "threads": args.threads, "precision": args.precision,
               "clinic_cases": len(clinic), "held_out": len(held_out), "train_wall_seconds": wall,
               "pretrained": str(args.pretrained), "organs": organs}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.results / "results.md").write_text(markdown(results) + "\n")
    for name in ("fine-tuned", "from scratch"):
        log = args.work / name.replace(" ", "_") / "train.log"
        if log.is_file():
            shutil.copy(log, args.results / f"{name.replace(' ', '_')}_train.log")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
