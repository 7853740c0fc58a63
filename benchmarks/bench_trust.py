"""What a clinician can trust: fold ensemble against single folds, QA flags against bad cases, confidence
against Dice, measured on a dataset's held-out test cases.

1. Cross-validation (`medseg.train.crossval.fit_folds`, the same as `medseg train --fold all`), or an
   existing cross-validation folder (`--cv`).
2. Every test case (the dataset's imagesTs/labelsTs) predicted by each fold alone and by the ensemble
   of all folds, all with the post-processing chosen out of fold and with uncertainty, and scored
   against its reference: per-organ Dice.
3. For the ensemble and for the single folds: of the organ-cases with Dice < 0.5, the share that any
   QA flag names (recall; the issue's goal >= 80 %); of the flagged organ-cases, the share with Dice
   < 0.7 (precision; goal >= 50 %); Spearman's rho of the per-organ confidence against Dice (goal
   >= 0.5); and the same rho over the out-of-fold organ-cases of the cross-validation.

Prints JSON and writes it to benchmarks/results/trust-<task>/results.json (or --results).

    # the issue's benchmark: the head-and-neck split (hours of CPU; run it on a GPU machine)
    python benchmarks/bench_trust.py --task headneck --data ../shared/datasets/openkbp-hn --folds 5
    # a tiny demonstration on the bundled prostate phantoms (~10 CPU-minutes)
    OMP_NUM_THREADS=1 python benchmarks/bench_trust.py --task prostate --folds 2 --epochs 3 --out /tmp/trust-cv
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

from medseg.config import load_task, sample_data_dir
from medseg.data.datasets import load_dataset
from medseg.evaluate.metrics import confusion, dice
from medseg.infer.ensemble import EnsemblePredictor, fold_folders, read_postprocessing
from medseg.infer.qa import Checker
from medseg.io import read_label, write_text
from medseg.train.crossval import SUMMARY_NAME, fit_folds, summarise
from medseg.train.run import TrainOptions

RESULTS = Path(__file__).resolve().parent / "results"


def _organ_cases(predictor: EnsemblePredictor, checker: Checker, cases, name: str) -> list[dict]:
    """One row per test case and organ: Dice, confidence, flags."""
    task = predictor.task
    rows = []
    for case in cases:
        seg = predictor.predict(list(case.images))
        seg.flags = checker(seg)
        reference, _ = read_label(case.label)
        for label_id, organ in task.label_names.items():
            tp, fp, fn, _ = confusion(reference == label_id, seg.labels == label_id)
            value = dice(tp, fp, fn)
            rows.append({"model": name, "case": case.name, "organ": organ,
                         "dice": None if math.isnan(value) else round(value, 4),
                         "confidence": (seg.confidence.get(organ) or {}).get("mean_probability"),
                         "flags": [f"{f['check']}: {f['reason']}" for f in seg.flags if f["organ"] == organ]})
    return rows


def _flag_quality(rows: list[dict]) -> dict:
    """Recall of flags for Dice < 0.5, precision for Dice < 0.7, Spearman of confidence against Dice."""
    from scipy.stats import spearmanr

    scored = [r for r in rows if r["dice"] is not None]
    bad = [r for r in scored if r["dice"] < 0.5]
    flagged = [r for r in scored if r["flags"]]
    pairs = [(r["confidence"], r["dice"]) for r in scored if r["confidence"] is not None]
    rho = spearmanr(*zip(*pairs)).statistic if len(pairs) > 2 else float("nan")
    return {"organ_cases": len(scored), "dice_below_0.5": len(bad), "flagged": len(flagged),
            "recall_dice_below_0.5": round(sum(1 for r in bad if r["flags"]) / len(bad), 3) if bad else None,
            "precision_dice_below_0.7": (round(sum(1 for r in flagged if r["dice"] < 0.7) / len(flagged), 3)
                                         if flagged else None),
            "spearman_confidence_dice": None if math.isnan(rho) else round(float(rho), 3),
            "confidence_pairs": len(pairs)}


def _dice_table(rows: list[dict], organs: list[str]) -> dict:
    table = {}
    for organ in organs:
        values = [r["dice"] for r in rows if r["organ"] == organ and r["dice"] is not None]
        table[organ] = round(float(np.mean(values)), 4) if values else None
    values = [v for v in table.values() if v is not None]
    table["mean"] = round(float(np.mean(values)), 4) if values else None
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="prostate")
    parser.add_argument("--data", type=Path, help="dataset folder; default: the task's bundled sample data")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--max-minutes", type=float, help="per fold")
    parser.add_argument("--out", type=Path, help="cross-validation folder to train into (or resume)")
    parser.add_argument("--cv", type=Path, help="an existing cross-validation folder: no training")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()

    start = time.perf_counter()
    task = load_task(args.task)
    data = args.data or sample_data_dir(task.sample_data)
    cv = args.cv
    if cv is None:
        cv = fit_folds(TrainOptions(task=args.task, data=data, out=args.out, epochs=args.epochs,
                                    max_minutes=args.max_minutes, device=args.device, folds=args.folds, fold=0),
                       echo=lambda line: print(line, file=sys.stderr))
    elif not (cv / SUMMARY_NAME).is_file():
        summarise(cv, device=args.device, echo=lambda line: print(line, file=sys.stderr))
    cases = [c for c in load_dataset(data, "test") if c.label is not None]
    if not cases:
        raise SystemExit(f"{data}: no test cases with labels to measure on")
    folds = fold_folders(cv)
    organs, source = read_postprocessing(cv)
    rows = []
    for k, folder in enumerate(folds):  # each fold alone, with the same post-processing as the ensemble
        single = EnsemblePredictor([folder], device=args.device, uncertainty=True, largest_component=organs,
                                   source=source)
        checker = Checker([folder], single.task, organs, with_confidence=True)
        rows += _organ_cases(single, checker, cases, f"fold_{k}")
    ensemble = EnsemblePredictor(folds, device=args.device, uncertainty=True, largest_component=organs, source=source)
    checker = Checker(folds, ensemble.task, organs, with_confidence=True)
    rows += _organ_cases(ensemble, checker, cases, "ensemble")

    names = list(task.label_names.values())
    singles = [r for r in rows if r["model"] != "ensemble"]
    summary = json.loads((cv / SUMMARY_NAME).read_text())
    result = {
        "task": task.name, "data": str(data), "cv_folder": str(cv), "folds": len(folds), "test_cases": len(cases),
        "dice": {"ensemble": _dice_table([r for r in rows if r["model"] == "ensemble"], names),
                 **{f"fold_{k}": _dice_table([r for r in rows if r["model"] == f"fold_{k}"], names)
                    for k in range(len(folds))},
                 "single_fold_mean": _dice_table(singles, names)},
        "flags": {"ensemble": _flag_quality([r for r in rows if r["model"] == "ensemble"]),
                  "single_folds": _flag_quality(singles)},
        "out_of_fold_confidence_vs_dice": summary["confidence_vs_dice"],
        "postprocessing": summary["postprocessing"]["largest_component"],
        "goals": {"recall_dice_below_0.5": 0.8, "precision_dice_below_0.7": 0.5, "spearman_confidence_dice": 0.5},
        "organ_cases": rows, "seconds": round(time.perf_counter() - start, 1),
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
    }
    text = json.dumps(result, indent=2)
    write_text(text + "\n", args.results or RESULTS / f"trust-{task.name}" / "results.json")
    print(json.dumps({k: v for k, v in result.items() if k != "organ_cases"}, indent=2))


if __name__ == "__main__":
    main()
