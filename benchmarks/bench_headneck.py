"""Real-data quality per CPU-minute: medseg's default against a plain MONAI tutorial, side by side.

Head-and-neck organs at risk on OpenKBP CT (partially labelled). Split (fixed): the dataset's 203
cases sorted by name; the first 170 train, the last 33 are held out and only predicted and scored.
medseg gets a dataset view listing the 170 and validates on 12 of them (`--folds 14 --fold 0`); the
plain script (`plain_monai_headneck.py`, written as a MONAI user would) validates on 20 of them.

Both train at once, each on `--threads` CPU threads, under the same wall-clock `--minutes` (medseg's
`--max-minutes`: preprocessing, steps, validation all count). At each `--snapshots` minute each run's
model is kept: medseg's current weights (last.pt; its schedule is planned for the whole budget, so an
early snapshot is a model mid-schedule, not a shorter run), the plain script's best checkpoint so
far. At the end medseg's saved model (the best validated checkpoint) is scored, and beside it its last
weights (`45min-last`): which of the two a short run should keep. Every snapshot then predicts the 33 held-out scans, and `medseg evaluate` scores them against
the contoured organs (Dice, HD95, surface Dice at the task file's per-organ tolerances).

Ablations run medseg alone with a task key changed (`--set schedule.ema_decay=0.999 --only medseg`).

Writes to `--results` (default benchmarks/results/headneck/): results.json and results.md (per organ and
snapshot), time breakdown, the plan, training logs, command.txt. Scratch goes to `--work`.

    python benchmarks/bench_headneck.py [--minutes 45] [--snapshots 15,30,45] [--threads 1]
        [--precision auto|bf16|fp32] [--only medseg|plain] [--set KEY=VALUE ...] [--val-cases N]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "openkbp-hn"
N_TRAIN = 170  # first cases by sorted name; the rest (33) are the benchmark's held-out cases
INTERNAL_FOLDS = 14  # medseg's own validation: 170 / 14 = 12 of the training cases (the task's validation_cases)
TASK = "headneck"
METRICS = (("dice", "Dice"), ("hd95_mm", "HD95 mm"), ("surface_dice", "surface Dice at the task's per-organ tolerance"))


def split_cases(data: Path) -> tuple[list[str], list[str], dict]:
    """(training names, held-out names, the dataset.json) of the fixed split."""
    meta = json.loads((data / "dataset.json").read_text())
    names = sorted(Path(e["image"]).name.removesuffix(".nii.gz") for e in meta["training"])
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


def task_file(changes: list[str], work: Path) -> str | Path:
    """The bundled task, or a copy with `key.sub=value` changes (values parsed as YAML)."""
    if not changes:
        return TASK
    settings = yaml.safe_load((ROOT / "pipelines" / f"{TASK}.yaml").read_text())
    for change in changes:
        key, value = change.split("=", 1)
        *parents, last = key.split(".")
        node = settings
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    path = work / f"{TASK}_changed.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def start(command: list, threads: int, log: Path) -> subprocess.Popen:
    """A process on `threads` CPU threads, its output to `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print("$ " + shlex.join(map(str, command)), flush=True)
    return subprocess.Popen(list(map(str, command)), cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def snapshot_medseg(run: Path, folder: Path) -> None:
    """A model folder holding the run's current weights (last.pt), as they are at this minute."""
    import torch

    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    weights = state["model"]
    if "average" in state:  # the saved model of an EMA run is the average
        weights = {k: state["average"]["shadow"][k].to(v.dtype) if k in state["average"]["shadow"] else v
                   for k, v in weights.items()}
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "config.json", folder / "config.json")
    torch.save({"model": weights, "step": state["progress"]["step"]}, folder / "best.pt")


def train_both(args, view: Path, task, work: Path) -> dict:
    """Both trainings at once; medseg's weights kept at every snapshot minute. Returns wall seconds."""
    medseg_run, plain_out = work / "medseg" / "run", work / "plain"
    procs = {}
    if args.only in (None, "medseg"):
        procs["medseg"] = start([sys.executable, "-m", "medseg", "train", "--task", task, "--data", view,
                                 "--out", medseg_run, "--max-minutes", args.minutes, "--folds", INTERNAL_FOLDS,
                                 "--fold", 0, "--seed", args.seed, "--device", "cpu", "--precision", args.precision],
                                args.threads, work / "medseg_train.out")
    if args.only in (None, "plain"):
        plain_precision = "fp32" if args.precision == "fp32" else "bf16"
        procs["plain"] = start([sys.executable, ROOT / "benchmarks" / "plain_monai_headneck.py", "--data", args.data,
                                "--out", plain_out, "--minutes", args.minutes, "--snapshots", args.snapshots,
                                "--threads", args.threads, "--precision", plain_precision, "--held-out", 0],
                               args.threads, work / "plain_train.out")
    began, wall, pending = time.perf_counter(), {}, sorted(float(m) for m in args.snapshots.split(","))
    while any(p.poll() is None for p in procs.values()):
        minutes = (time.perf_counter() - began) / 60
        while pending and minutes >= pending[0] and "medseg" in procs:
            if (medseg_run / "last.pt").is_file() and pending[0] < args.minutes:
                snapshot_medseg(medseg_run, work / "medseg" / f"{pending[0]:g}min")
            pending.pop(0)
        for name, proc in procs.items():
            if proc.poll() is not None and name not in wall:
                wall[name] = time.perf_counter() - began
        time.sleep(2)
    for name, proc in procs.items():
        wall.setdefault(name, time.perf_counter() - began)
        if proc.returncode:
            raise SystemExit(f"error: {name} training failed (exit {proc.returncode}); see {work / (name + '_train.out')}")
    if "medseg" in procs:  # the end of the run: its saved model (best.pt), and its last weights beside it
        final = work / "medseg" / f"{args.minutes:g}min"
        final.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "best.pt"):
            shutil.copy(medseg_run / name, final / name)
        snapshot_medseg(medseg_run, work / "medseg" / f"{args.minutes:g}min-last")
    return wall


def snapshot_order(folder: Path) -> tuple[float, str]:
    """'15min' < '30min' < '45min' < '45min-last'."""
    return float(folder.name.split("min")[0]), folder.name


def predict_all(args, held_out: list[str], work: Path) -> dict:
    """Each snapshot of each pipeline predicts the held-out scans (both pipelines at once)."""
    images = [args.data / "imagesTr" / f"{name}.nii.gz" for name in held_out]
    procs, began = [], time.perf_counter()
    if args.only in (None, "medseg"):
        script = "; ".join(shlex.join([sys.executable, "-m", "medseg", "predict", *map(str, images), "--model",
                                       str(folder), "--out", str(folder / "predictions"), "--no-overlays",
                                       "--device", "cpu", "--precision", args.precision])
                           for folder in sorted((work / "medseg").glob("*min*")))
        procs.append(start(["bash", "-c", script], args.threads, work / "medseg_predict.out"))
    if args.only in (None, "plain"):
        plain_precision = "fp32" if args.precision == "fp32" else "bf16"
        procs.append(start([sys.executable, ROOT / "benchmarks" / "plain_monai_headneck.py", "--data", args.data,
                            "--out", work / "plain", "--threads", args.threads, "--precision", plain_precision,
                            "--snapshots", args.snapshots, "--held-out", len(held_out), "--predict-only"], args.threads, work / "plain_predict.out"))
    for proc in procs:
        if proc.wait():
            raise SystemExit(f"error: prediction failed (exit {proc.returncode}); see {work}/*_predict.out")
    return {"predict_seconds": round(time.perf_counter() - began, 1)}


def evaluate(predictions: Path, held_out: list[str], args, out: Path) -> dict:
    """`medseg evaluate` of one snapshot's masks: organ -> metric -> {mean, std, n}."""
    masks = out / "masks"
    masks.mkdir(parents=True, exist_ok=True)
    for name in held_out:
        os.symlink((predictions / f"{name}_seg.nii.gz").resolve(), masks / f"{name}_seg.nii.gz")
    subprocess.run([sys.executable, "-m", "medseg", "evaluate", "--pred", masks, "--ref", args.data, "--task", TASK,
                    "--out", out / "evaluation"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    return {organ: {key: {k: metrics[key][k] for k in ("mean", "std", "n")} for key, _ in METRICS}
            for organ, metrics in summary.items() if organ != "all"}


def medseg_time(run: Path) -> dict:
    """Where medseg's wall clock went: preprocessing, steps, validation (from plan.json and metrics.csv)."""
    plan = json.loads((run / "plan.json").read_text()) if (run / "plan.json").is_file() else {}
    with (run / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    total = lambda key: round(sum(float(r[key]) for r in rows if r.get(key)), 1)  # noqa: E731
    return {"preprocessing": plan.get("preprocessing_seconds"), "steps": total("step_seconds"),
            "validation": total("validation_seconds"), "steps_done": int(rows[-1]["step"]) if rows else 0,
            "validations": sum(1 for r in rows if r.get("mean_dice")), "plan": plan}


def plain_time(out: Path) -> dict:
    log = json.loads((out / "log.json").read_text())
    return {k: log.get(k) for k in ("steps", "seconds", "validations", "snapshots", "machine", "cpu_flags")
            if k in log}


def markdown(results: dict) -> str:
    lines = [f"Head and neck, {results['held_out']} held-out cases (contoured organs only), {results['minutes']:g} "
             f"wall-clock minutes per run, {results['threads']} thread(s) each, precision {results['precision']}. "
             f"Command: `{results['command']}`", ""]
    for metric, name in METRICS:
        columns = [(pipeline, snap) for pipeline, snaps in results["organs"].items() for snap in snaps]
        organs = list(next(iter(next(iter(results["organs"].values())).values())))
        lines += [f"**{name}** (mean over held-out cases)", "",
                  "| organ | " + " | ".join(f"{p} {s}" for p, s in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for organ in organs + ["mean"]:
            cells = []
            for pipeline, snap in columns:
                table = results["organs"][pipeline][snap]
                values = [table[o][metric]["mean"] for o in organs if table[o][metric]["mean"] is not None]
                value = (sum(values) / len(values) if values else None) if organ == "mean" else table[organ][metric]["mean"]
                cells.append("-" if value is None else f"{value:.3f}" if metric != "hd95_mm" else f"{value:.1f}")
            lines.append(f"| {organ} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the openkbp-hn dataset folder")
    parser.add_argument("--minutes", type=float, default=45.0, help="wall-clock budget of each training run")
    parser.add_argument("--snapshots", default="15,30,45", help="minutes at which each run's model is kept")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each run (both run at once)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--only", choices=("medseg", "plain"), default=None, help="run one pipeline")
    parser.add_argument("--set", action="append", default=[], help="change a task key for medseg: KEY=VALUE")
    parser.add_argument("--val-cases", type=int, default=None, help="score only the first N held-out cases")
    parser.add_argument("--seed", type=int, default=0, help="medseg's training seed (another one: the seed's spread)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "headneck")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "headneck")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "benchmarks/bench_headneck.py", *(sys.argv[1:] if argv is None else argv)])
    args.data = args.data.resolve()
    if not (args.data / "dataset.json").is_file():
        raise SystemExit(f"error: {args.data} is not the openkbp-hn dataset folder (no dataset.json); pass --data")
    train, held_out, meta = split_cases(args.data)
    held_out = held_out[: args.val_cases] if args.val_cases else held_out
    if args.work.exists():
        shutil.rmtree(args.work)
    view = write_view(args.data, meta, train, args.work / "train_data")
    wall = train_both(args, view, task_file(args.set, args.work), args.work)
    seconds = {"train_wall": {k: round(v, 1) for k, v in wall.items()}, **predict_all(args, held_out, args.work)}
    organs = {}
    for folder in sorted((args.work / "medseg").glob("*min*"), key=snapshot_order):
        organs.setdefault("medseg", {})[folder.name] = evaluate(folder / "predictions", held_out, args, folder)
    for folder in sorted((args.work / "plain" / "predictions").glob("*min"), key=lambda p: float(p.name[:-3])):
        organs.setdefault("plain", {})[folder.name] = evaluate(folder, held_out, args, args.work / "plain" / folder.name)
    results = {"command": command, "minutes": args.minutes, "threads": args.threads, "precision": args.precision,
               "task_changes": args.set, "seed": args.seed, "held_out": len(held_out), "seconds": seconds,
               "organs": organs,
               "time": {**({"medseg": medseg_time(args.work / "medseg" / "run")} if "medseg" in organs else {}),
                        **({"plain": plain_time(args.work / "plain")} if "plain" in organs else {})}}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.results / "results.md").write_text(markdown(results))
    (args.results / "command.txt").write_text(command + "\n")
    for name in ("train.log", "metrics.csv", "plan.json", "training_curve.png"):
        if (args.work / "medseg" / "run" / name).is_file():
            shutil.copy(args.work / "medseg" / "run" / name, args.results / f"medseg_{name}")
    if (args.work / "plain" / "log.json").is_file():
        shutil.copy(args.work / "plain" / "log.json", args.results / "plain_log.json")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
