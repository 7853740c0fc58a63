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

The confidence flag uses each model folder's confidence.json where it has one, as `medseg predict`
does (`medseg.infer.calibration`), else the global 0.8. `--calibrate` first chooses the per-organ
thresholds afresh, for models trained elsewhere: each model folder predicts its own validation cases
(its config.json's split, read from --data: cases it did not train on, among the first 170) exactly
as it will predict the held-out ones, and the ensemble the validation cases that none of its members
trained on. Any held-out case among them is refused. A cross-validation folder brings its own
confidence.json (its out-of-fold predictions; `medseg calibrate CV`). Nothing is written into the
model folders: the thresholds go to results.json (`calibration`) and results.md.

Writes results.json (with every organ-case row) and results.md to --results.

    python benchmarks/bench_trust_headneck.py --models runs/headneck/a runs/headneck/b \\
        [--data ../shared/datasets/openkbp-hn] [--calibrate] [--tta] [--cases N] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path

from bench_headneck import DEFAULT_DATA, split_cases
from bench_trust import dice_table, flag_quality, organ_cases

from medseg.data.datasets import Case, load_dataset
from medseg.data.fingerprint import compute_fingerprint
from medseg.errors import InputError
from medseg.infer.calibration import Calibration, calibrate_rows, predict_rows, read_calibration, unseen_cases
from medseg.infer.ensemble import EnsemblePredictor, is_cv_folder, model_folders, read_postprocessing
from medseg.infer.qa import Checker, TrainingStats
from medseg.io import write_text
from medseg.model.folder import read_run_config

RESULTS = Path(__file__).resolve().parent / "results" / "trust-headneck"
GOALS = {"recall_dice_below_0.5": 0.8, "precision_dice_below_0.7": 0.5, "spearman_confidence_dice": 0.5,
         "spearman_estimated_dice": 0.5}  # rho of the raw confidence, and of the calibration's estimated Dice
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
    """A model folder as `medseg predict -m MODEL --uncertainty` runs it, and its QA checks (with the folder's
    confidence.json, where it has one)."""
    chosen = read_postprocessing(model) if is_cv_folder(model) else None
    organs, source = chosen if chosen else (None, "task file (inference.largest_component)")
    predictor, checker = ensemble_predictor(model_folders(model), device, tta, organs, source)
    checker.calibration = read_calibration(model)
    return predictor, checker


def ensemble_predictor(folders: Sequence[Path], device: str, tta: bool, organs: Sequence[str] | None = None,
                       source: str = "task file (inference.largest_component)") -> tuple[EnsemblePredictor, Checker]:
    predictor = EnsemblePredictor(folders, device=device, tta=tta or None, uncertainty=True,
                                  largest_component=organs, source=source)
    checker = Checker(folders, predictor.task, predictor.postprocessing["largest_component"], with_confidence=True)
    return predictor, checker


def refuse_held_out(calibration: dict, held_out: Collection[str], model: str) -> None:
    """A calibration that saw a held-out case would flatter the flags: refused."""
    seen = sorted(set(calibration["cases"]) & set(held_out))
    if seen:
        raise InputError(f"{model}: calibration on held-out case(s) {', '.join(seen[:3])} refused; calibrate on "
                         f"validation cases among the first 170 only")


def calibrate_on_validation(predictor: EnsemblePredictor, data: Path, held_out: Collection[str]) -> dict:
    """confidence.json's data for `predictor`, from the validation cases (in `data`) that none of its model
    folders trained on, predicted as the held-out cases will be; a held-out case among them is refused."""
    cases = unseen_cases(predictor.folders, data)
    refuse_held_out({"cases": [case.name for case in cases]}, held_out, str(predictor.folders[0]))
    start = time.perf_counter()
    rows = predict_rows(predictor, cases, echo=lambda line: None)
    flips = predictor.members[0].tta
    source = (f"{len(cases)} validation case(s) that none of its {len(predictor.folders)} model folder(s) trained on"
              f"{', with test-time flips' if flips else ''}")
    return calibrate_rows(rows, list(predictor.task.label_names.values()), source, flips, time.perf_counter() - start)


def calibrate_run(name: str, model: Path | None, predictor: EnsemblePredictor, data: Path,
                  held_out: Collection[str]) -> dict:
    """`--calibrate` for one run: a model folder's own validation cases (a cross-validation folder: its
    confidence.json), or the ensemble's common ones; for an ensemble without any, the reason instead."""
    if model is not None and is_cv_folder(model):
        if read_calibration(model) is None:  # read_calibration also checks the file
            raise InputError(f"{model}: a cross-validation folder is calibrated on its out-of-fold predictions; run "
                             f"`medseg calibrate {model}` first")
        calibration = json.loads((model / "confidence.json").read_text())
        refuse_held_out(calibration, held_out, name)
        return calibration
    try:
        return calibrate_on_validation(predictor, data, held_out)
    except InputError as error:
        if model is not None or "held-out" in str(error):
            raise
        return {"not_calibrated": str(error)}


def _use(calibration: dict) -> Calibration | None:
    if "organs" not in calibration:
        return None
    return Calibration(calibration["organs"], calibration["source"], calibration["tta"])


def measure(models: Sequence[Path], cases: Sequence[Case], device: str = "auto", tta: bool = False,
            statistics_from: Path | None = None, echo=print, calibrate_from: Path | None = None) -> dict:
    """Predict and score `cases` with each model and (with two or more) their ensemble; see the module's notes.

    Args:
        statistics_from: a dataset to compute the QA flags' organ statistics from again (`recompute_statistics`);
            None: the model folders' own.
        calibrate_from: the dataset of the models' validation cases, to choose the confidence thresholds from
            first (`calibrate_run`); None: each model folder's confidence.json, where it has one.
    """
    check_unseen(models, cases)
    held_out = {case.name for case in cases} | (set(split_cases(calibrate_from)[1]) if calibrate_from else set())
    runs = list(zip(short_names(models), models))
    if len(models) > 1:
        runs.append((ENSEMBLE, None))
    rows, seconds, organs, known, calibrations = [], {}, [], {}, {}
    for name, model in runs:
        start = time.perf_counter()
        if model is None:
            predictor, checker = ensemble_predictor([f for m in models for f in model_folders(m)], device, tta)
        else:
            predictor, checker = model_predictor(model, device, tta)
        if statistics_from is not None:
            checker.stats = recompute_statistics(predictor.folders, statistics_from, known)
        if calibrate_from is not None:
            echo(f"{name}: calibrating the confidence flag on its validation cases")
            calibrations[name] = calibrate_run(name, model, predictor, calibrate_from, held_out)
            checker.calibration = _use(calibrations[name])
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
            "calibration": calibrations or None, "dice": dice,
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
              "Dice < 0.7) | Spearman rho (n) | rho, estimated Dice (n) |"), "|---|---|---|---|---|---|---|---|"]
    for name, q in result["flags"].items():
        lines.append(f"| {name} | {q['organ_cases']} | {q['dice_below_0.5']} | {q['flagged']} | "
                     f"{_cell(q['recall_dice_below_0.5'])} | {_cell(q['precision_dice_below_0.7'])} | "
                     f"{_cell(q['spearman_confidence_dice'])} ({q['confidence_pairs']}) | "
                     f"{_cell(q.get('spearman_estimated_dice'))} ({q.get('estimate_pairs', 0)}) |")
    judged = result["flags"][result["judged"]]
    lines += ["", f"**Spearman rho per organ** ({result['judged']})", "", "| organ | rho | n |", "|---|---|---|"]
    lines += [f"| {organ} | {_cell(s['rho'])} | {s['n']} |" for organ, s in judged["spearman_per_organ"].items()]
    lines += calibration_lines(result.get("calibration"), organs)
    met = ", ".join(f"{k} {'met' if ok else 'not met'}" for k, ok in result["met"].items())
    return "\n".join(lines + ["", f"Goals ({result['judged']}): {met}.", ""])


def calibration_lines(calibrations: dict | None, organs: Sequence[str]) -> list[str]:
    """With --calibrate: each run's confidence threshold per organ, and the validation cases it came from."""
    if not calibrations:
        return []
    names = list(calibrations)
    lines = ["", "**Confidence thresholds** (chosen on validation cases; `-`: the default 0.8; cases in brackets)",
             "", "| organ | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for organ in organs:
        cells = []
        for name in names:
            entry = calibrations[name].get("organs", {}).get(organ)
            cells.append("-" if not entry else f"{_cell(entry['threshold'], 3)} ({entry['cases']})")
        lines.append(f"| {organ} | " + " | ".join(cells) + " |")
    for name in names:
        calibration = calibrations[name]
        where = calibration.get("not_calibrated") or (f"{calibration['source']}: {', '.join(calibration['cases'])}"
                                                      f" ({_cell(calibration.get('seconds'), 1)} s)")
        lines.append(f"- {name}: {where}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, nargs="+", required=True,
                        help="model folders (run or cross-validation folders) of the headneck task")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the openkbp-hn dataset folder")
    parser.add_argument("--cases", type=int, default=None, help="only the first N held-out cases (a quick check)")
    parser.add_argument("--tta", action="store_true", help="test-time flips in every prediction")
    parser.add_argument("--calibrate", action="store_true",
                        help="first choose each model's per-organ confidence thresholds on its own validation cases "
                        "in --data (never a held-out case); default: each model folder's confidence.json, if any")
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
                         echo=lambda line: print(line, file=sys.stderr),
                         calibrate_from=args.data if args.calibrate else None)
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
