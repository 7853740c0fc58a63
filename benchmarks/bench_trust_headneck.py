"""What a clinician can trust on head-and-neck CT, for models trained elsewhere: each model alone against
their ensemble, QA flags against bad organs, confidence against Dice, on the held-out OpenKBP cases.

Given model folders (`--models A B ...`: run folders, or cross-validation folders, each then the
ensemble of its folds with its chosen post-processing) and the openkbp-hn dataset, the held-out cases
of `bench_headneck.split_cases` (the last 33 by sorted name; a model that trained on any of them is
refused) are predicted by each model alone and by the ensemble of all the model folders given
(`medseg.infer.ensemble.EnsemblePredictor`, the task file's post-processing), every one with
uncertainty (and `--tta` flips if asked), then scored on the organs each case contoured (Dice; an
organ absent from both masks is left out). For each model and the ensemble (`bench_trust.flag_quality`):

- per-organ mean Dice, the ensemble against each model alone;
- of the organ-cases with Dice < 0.5, the share a QA flag names (goal >= 80 %); of the flagged
  organ-cases, the share with Dice < 0.7 (goal >= 50 %); notes (an organ outside the field of
  view) are not flags;
- Spearman's rho of the organ's confidence against Dice over the organ-cases predicted (goal >= 0.5),
  over all organs and per organ.

The QA flags compare against the organ statistics in each model folder's config.json. Folders trained
before the R-L and A-P offsets were recorded check the field of view head-foot only (`missing`);
`--recompute-statistics` computes the statistics again from each model's training cases (its
config.json's split, read from --data), as a model trained now would hold them.

Writes results.json (with every organ-case row) and results.md to --results.

    python benchmarks/bench_trust_headneck.py --models runs/headneck/a runs/headneck/b \\
        [--data ../shared/datasets/openkbp-hn] [--tta] [--cases N] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench_headneck import DEFAULT_DATA, split_cases
from bench_trust import dice_table, flag_quality, organ_cases

from medseg.data.datasets import Case, load_dataset
from medseg.data.fingerprint import compute_fingerprint
from medseg.errors import InputError
from medseg.infer.ensemble import EnsemblePredictor, is_cv_folder, model_folders, read_postprocessing
from medseg.infer.qa import Checker, TrainingStats
from medseg.io import write_text
from medseg.model.folder import read_run_config

RESULTS = Path(__file__).resolve().parent / "results" / "trust-headneck"
GOALS = {"recall_dice_below_0.5": 0.8, "precision_dice_below_0.7": 0.5, "spearman_confidence_dice": 0.5}
ENSEMBLE = "ensemble"


def held_out_cases(data: Path, count: int | None = None) -> list[Case]:
    """The benchmark's held-out cases (`split_cases`), with their `contoured` organs; the first `count`."""
    _, names, _ = split_cases(data)
    cases = {case.name: case for case in load_dataset(data)}
    return [cases[name] for name in names[:count]]


def check_unseen(models: Sequence[Path], cases: Sequence[Case]) -> None:
    """Refuse a model folder that trained or validated on a held-out case: its Dice would flatter it."""
    held_out = {case.name for case in cases}
    for model in models:
        for folder in model_folders(model):
            seen = sorted(held_out & {n for names in read_run_config(folder).split.values() for n in names})
            if seen:
                raise InputError(f"{folder}: trained on held-out case(s) {', '.join(seen[:3])}"
                                 f"{' ...' if len(seen) > 3 else ''}; train on the first 170 cases only")


def short_names(models: Sequence[Path]) -> list[str]:
    """Each model folder's name, with its parent's where two share one (runs/a/run, runs/b/run)."""
    names = [m.name for m in models]
    return [f"{m.parent.name}/{m.name}" if names.count(m.name) > 1 else m.name for m in models]


def recompute_statistics(folders: Sequence[Path], data: Path, known: dict) -> TrainingStats | None:
    """The organ statistics of the folders' training cases (their config.json's split, read from `data`),
    computed by this medseg; `known` caches them by split, which several models may share."""
    fingerprints = []
    for folder in folders:
        config = read_run_config(folder)
        key = tuple(sorted(config.split["train"]))
        if key not in known:
            cases = {case.name: case for case in load_dataset(data)}
            missing = [name for name in key if name not in cases]
            if missing:
                raise InputError(f"{folder}: trained on case(s) {', '.join(missing[:3])} that {data} does not hold")
            known[key] = compute_fingerprint([cases[name] for name in key], config.task)
        fingerprints.append(known[key])
    return TrainingStats.from_fingerprints(fingerprints)


def model_predictor(model: Path, device: str, tta: bool) -> tuple[EnsemblePredictor, Checker]:
    """A model folder as `medseg predict -m MODEL --uncertainty` runs it, and its QA checks."""
    chosen = read_postprocessing(model) if is_cv_folder(model) else None
    organs, source = chosen if chosen else (None, "task file (inference.largest_component)")
    return ensemble_predictor(model_folders(model), device, tta, organs, source)


def ensemble_predictor(folders: Sequence[Path], device: str, tta: bool, organs: Sequence[str] | None = None,
                       source: str = "task file (inference.largest_component)") -> tuple[EnsemblePredictor, Checker]:
    predictor = EnsemblePredictor(folders, device=device, tta=tta or None, uncertainty=True,
                                  largest_component=organs, source=source)
    checker = Checker(folders, predictor.task, predictor.postprocessing["largest_component"], with_confidence=True)
    return predictor, checker


def measure(models: Sequence[Path], cases: Sequence[Case], device: str = "auto", tta: bool = False,
            statistics_from: Path | None = None, echo=print) -> dict:
    """Predict and score `cases` with each model and (with two or more) their ensemble; see the module's notes.

    Args:
        statistics_from: a dataset to compute the QA flags' organ statistics from again (`recompute_statistics`);
            None: the model folders' own.
    """
    check_unseen(models, cases)
    runs = list(zip(short_names(models), models))
    if len(models) > 1:
        runs.append((ENSEMBLE, None))
    rows, seconds, organs, known = [], {}, [], {}
    for name, model in runs:
        start = time.perf_counter()
        if model is None:
            predictor, checker = ensemble_predictor([f for m in models for f in model_folders(m)], device, tta)
        else:
            predictor, checker = model_predictor(model, device, tta)
        if statistics_from is not None:
            checker.stats = recompute_statistics(predictor.folders, statistics_from, known)
        echo(f"{name}: predicting {len(cases)} held-out case(s) with {len(predictor.members)} model folder(s)")
        rows += organ_cases(predictor, checker, cases, name)
        seconds[name] = round(time.perf_counter() - start, 1)
        organs = list(predictor.task.label_names.values())
    names = [name for name, _ in runs]
    dice = {name: dice_table([r for r in rows if r["model"] == name], organs) for name in names}
    flags = {name: flag_quality([r for r in rows if r["model"] == name]) for name in names}
    judged = ENSEMBLE if ENSEMBLE in names else names[0]
    return {"models": {name: str(model) for name, model in runs if model is not None}, "cases": len(cases),
            "case_names": [c.name for c in cases], "tta": tta, "statistics_recomputed": statistics_from is not None,
            "dice": dice,
            "ensemble_minus_best_single": _gain(dice, names) if ENSEMBLE in names else None,
            "flags": flags, "goals": GOALS, "judged": judged,
            "met": {k: (flags[judged][k] is not None and flags[judged][k] >= goal) for k, goal in GOALS.items()},
            "seconds": seconds, "organ_cases": rows}


def _gain(dice: dict, names: list[str]) -> dict:
    """Per organ: the ensemble's mean Dice minus the best single model's."""
    gain = {}
    for organ, value in dice[ENSEMBLE].items():
        singles = [dice[n][organ] for n in names if n != ENSEMBLE and dice[n][organ] is not None]
        gain[organ] = None if value is None or not singles else round(value - max(singles), 4)
    return gain


def _cell(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    """Per-organ Dice of every model and the ensemble; flag recall, precision and rho against the goals."""
    names = list(result["dice"])
    organs = list(result["dice"][names[0]])
    gain = result["ensemble_minus_best_single"]
    columns = names + (["ensemble - best single"] if gain else [])
    lines = [(f"Head and neck, {result['cases']} held-out cases, contoured organs only"
             f"{', test-time flips' if result['tta'] else ''}. Command: `{result['command']}`"), "",
             "**Mean Dice per organ**", "", "| organ | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for organ in organs:
        cells = [_cell(result["dice"][n][organ]) for n in names]
        cells += [("-" if gain[organ] is None else f"{gain[organ]:+.3f}")] if gain else []
        lines.append(f"| {organ} | " + " | ".join(cells) + " |")
    lines += ["", "**QA flags and confidence** (goals: recall >= 0.8, precision >= 0.5, rho >= 0.5)", "",
              ("| model | organ-cases | Dice < 0.5 | flagged | recall (Dice < 0.5 flagged) | precision (flagged, "
              "Dice < 0.7) | Spearman rho (n) |"), "|---|---|---|---|---|---|---|"]
    for name, q in result["flags"].items():
        lines.append(f"| {name} | {q['organ_cases']} | {q['dice_below_0.5']} | {q['flagged']} | "
                     f"{_cell(q['recall_dice_below_0.5'])} | {_cell(q['precision_dice_below_0.7'])} | "
                     f"{_cell(q['spearman_confidence_dice'])} ({q['confidence_pairs']}) |")
    judged = result["flags"][result["judged"]]
    lines += ["", f"**Spearman rho per organ** ({result['judged']})", "", "| organ | rho | n |", "|---|---|---|"]
    lines += [f"| {organ} | {_cell(s['rho'])} | {s['n']} |" for organ, s in judged["spearman_per_organ"].items()]
    met = ", ".join(f"{k} {'met' if ok else 'not met'}" for k, ok in result["met"].items())
    return "\n".join(lines + ["", f"Goals ({result['judged']}): {met}.", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, nargs="+", required=True,
                        help="model folders (run or cross-validation folders) of the headneck task")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the openkbp-hn dataset folder")
    parser.add_argument("--cases", type=int, default=None, help="only the first N held-out cases (a quick check)")
    parser.add_argument("--tta", action="store_true", help="test-time flips in every prediction")
    parser.add_argument("--recompute-statistics", action="store_true",
                        help="the QA flags' organ statistics from each model's training cases in --data, computed "
                        "again (model folders from before the R-L and A-P offsets)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    command = shlex.join(["python", "benchmarks/bench_trust_headneck.py", *(sys.argv[1:] if argv is None else argv)])
    if not (args.data / "dataset.json").is_file():
        raise SystemExit(f"error: {args.data} is not the openkbp-hn dataset folder (no dataset.json); pass --data")
    start = time.perf_counter()
    try:
        result = measure(args.models, held_out_cases(args.data, args.cases), args.device, args.tta,
                         args.data if args.recompute_statistics else None,
                         echo=lambda line: print(line, file=sys.stderr))
    except InputError as error:
        raise SystemExit(f"error: {error}") from None
    result = {"command": command, "data": str(args.data), **result, "total_seconds": round(time.perf_counter() - start, 1),
              "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()}}
    write_text(json.dumps(result, indent=2) + "\n", args.results / "results.json")
    write_text(markdown(result), args.results / "results.md")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
