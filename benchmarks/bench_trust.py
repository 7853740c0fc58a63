"""What a clinician can trust: fold ensemble against single folds, QA flags against bad cases, confidence
against Dice, measured on a dataset's held-out test cases.

1. Cross-validation (`medseg.train.crossval.fit_folds`, the same as `medseg train --fold all`), or an
   existing cross-validation folder (`--cv`).
2. Every test case (the dataset's imagesTs/labelsTs) predicted by each fold alone and by the ensemble
   of all folds, all with the post-processing chosen out of fold and with uncertainty, and scored
   against its reference: per-organ Dice, on the organs the case contoured.
3. For the ensemble and for the single folds: of the organ-cases with Dice < 0.5, the share that any
   QA flag names (recall; the issue's goal >= 80 %); of the flagged organ-cases, the share with Dice
   < 0.7 (precision; goal >= 50 %); Spearman's rho of the per-organ confidence against Dice (goal
   >= 0.5), overall and per organ; and the same rho over the out-of-fold organ-cases of the
   cross-validation. Notes (an organ outside the field of view, severity 0) are not flags.

Prints JSON and writes it to benchmarks/results/trust-<task>/results.json (or --results).

    # head-and-neck models trained elsewhere (no cross-validation): benchmarks/bench_trust_headneck.py
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


def organ_cases(predictor: EnsemblePredictor, checker: Checker, cases, name: str) -> list[dict]:
    """One row per test case and contoured organ (all organs where a case has no `contoured` list): Dice,
    confidence, flags (the QA flags naming the organ; notes such as `outside`, severity 0, apart)."""
    task = predictor.task
    rows = []
    for case in cases:
        seg = predictor.predict(list(case.images))
        seg.flags = checker(seg)
        reference, _ = read_label(case.label)
        for label_id, organ in task.label_names.items():
            if case.contoured is not None and organ not in case.contoured:
                continue
            tp, fp, fn, _ = confusion(reference == label_id, seg.labels == label_id)
            value = dice(tp, fp, fn)
            mine = [f for f in seg.flags if f["organ"] == organ]
            rows.append({"model": name, "case": case.name, "organ": organ,
                         "dice": None if math.isnan(value) else round(value, 4),
                         "confidence": (seg.confidence.get(organ) or {}).get("mean_probability"),
                         "estimated_dice": (seg.confidence.get(organ) or {}).get("estimated_dice"),
                         "flags": [f"{f['check']}: {f['reason']}" for f in mine if f["severity"] > 0],
                         "notes": [f"{f['check']}: {f['reason']}" for f in mine if f["severity"] <= 0]})
    return rows


def spearman(pairs: list[tuple[float, float]]) -> dict:
    """Spearman's rho of (confidence, Dice) pairs, and n; rho None under 3 pairs or with a constant side."""
    from scipy.stats import spearmanr

    if len(pairs) < 3 or len({p[0] for p in pairs}) < 2 or len({p[1] for p in pairs}) < 2:
        return {"rho": None, "n": len(pairs)}
    rho = spearmanr(*zip(*pairs)).statistic
    return {"rho": None if math.isnan(rho) else round(float(rho), 3), "n": len(pairs)}


def flag_quality(rows: list[dict]) -> dict:
    """Recall of flags for Dice < 0.5, precision for Dice < 0.7, Spearman of confidence against Dice (over
    the organ-cases with a confidence: the organ predicted somewhere), overall and per organ."""
    scored = [r for r in rows if r["dice"] is not None]
    bad = [r for r in scored if r["dice"] < 0.5]
    flagged = [r for r in scored if r["flags"]]
    pairs = [(r["confidence"], r["dice"]) for r in scored if r["confidence"] is not None]
    overall = spearman(pairs)
    # the calibration's per-organ line from expected Dice (medseg.infer.calibration), where it was fitted
    estimates = spearman([(r["estimated_dice"], r["dice"]) for r in scored if r.get("estimated_dice") is not None])
    checks = sorted({flag.split(":")[0] for r in bad for flag in r["flags"]})
    return {"organ_cases": len(scored), "dice_below_0.5": len(bad), "flagged": len(flagged),
            "recall_dice_below_0.5": round(sum(1 for r in bad if r["flags"]) / len(bad), 3) if bad else None,
            "precision_dice_below_0.7": (round(sum(1 for r in flagged if r["dice"] < 0.7) / len(flagged), 3)
                                         if flagged else None),
            "spearman_confidence_dice": overall["rho"], "confidence_pairs": overall["n"],
            "checks_on_dice_below_0.5": {c: sum(1 for r in bad if any(f.startswith(c + ":") for f in r["flags"]))
                                         for c in checks},
            "spearman_per_organ": {organ: spearman([(r["confidence"], r["dice"]) for r in scored
                                                    if r["organ"] == organ and r["confidence"] is not None])
                                   for organ in dict.fromkeys(r["organ"] for r in rows)},
            "spearman_estimated_dice": estimates["rho"], "estimate_pairs": estimates["n"]}


def dice_table(rows: list[dict], organs: list[str]) -> dict:
    """Mean Dice per organ over the rows scored (None where none), and the mean of those means."""
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
        rows += organ_cases(single, checker, cases, f"fold_{k}")
    ensemble = EnsemblePredictor(folds, device=args.device, uncertainty=True, largest_component=organs, source=source)
    checker = Checker(folds, ensemble.task, organs, with_confidence=True)
    rows += organ_cases(ensemble, checker, cases, "ensemble")

    names = list(task.label_names.values())
    singles = [r for r in rows if r["model"] != "ensemble"]
    summary = json.loads((cv / SUMMARY_NAME).read_text())
    result = {
        "task": task.name, "data": str(data), "cv_folder": str(cv), "folds": len(folds), "test_cases": len(cases),
        "dice": {"ensemble": dice_table([r for r in rows if r["model"] == "ensemble"], names),
                 **{f"fold_{k}": dice_table([r for r in rows if r["model"] == f"fold_{k}"], names)
                    for k in range(len(folds))},
                 "single_fold_mean": dice_table(singles, names)},
        "flags": {"ensemble": flag_quality([r for r in rows if r["model"] == "ensemble"]),
                  "single_folds": flag_quality(singles)},
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
