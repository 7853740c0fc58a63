"""Cross-validation: every fold of a task trained in turn, the held-out cases predicted, one summary.

`medseg train --fold all --folds K --out CV` trains fold k into `CV/fold_k` (a normal model folder:
split k of K with the run's seed) one fold after another; run again, it resumes the fold that was
stopped and leaves finished ones as they are. Each fold then predicts its own held-out cases
(out-of-fold: cases it never trained on) without post-processing, into `CV/oof/`:
`<case>_seg.nii.gz`, `<case>_prob_<organ>.nii.gz` (uint8 percent) and `<case>.json` (Dice with and
without keep-largest-piece, confidence, volumes); a case already predicted by the fold's present
weights is not predicted again. From those predictions:

- `postprocessing.json`: per organ, keep-largest-piece is switched on when it does not lower the
  organ's mean out-of-fold Dice (nnU-Net's rule; `choose_postprocessing`). `medseg predict -m CV`
  uses it instead of the task file's `inference.largest_component`.
- `cv_summary.json` and `cv_summary.csv`: per fold and organ the mean Dice (post-processed as chosen,
  and raw), mean ± std over the folds, and Spearman's ρ of each confidence score against Dice over
  the out-of-fold organ-cases; `cv_cases.csv`: one row per case and organ.
- `confidence.json`: per organ, the confidence below which `medseg predict -m CV` flags it, chosen from
  the pooled out-of-fold confidences and Dices (`medseg.infer.calibration`; `calibrate_folds` alone).

With several GPUs, train the folds side by side, one process each (`medseg train --fold K --out
CV/fold_K`, e.g. with `CUDA_VISIBLE_DEVICES=K`); `medseg train --fold all --out CV` then finds them
finished and only predicts and summarises.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np

from medseg.config import Task
from medseg.data.datasets import Case, load_dataset
from medseg.errors import InputError
from medseg.infer.ensemble import CROSSVAL_NAME
from medseg.io import read_label, write_image, write_label_map, write_text
from medseg.model.folder import CONFIG_NAME, read_run_config
from medseg.train.run import TrainOptions, fit

SUMMARY_NAME = "cv_summary.json"
OOF_FOLDER = "oof"
RULE = ("keep-largest-piece per organ when it does not lower the organ's mean out-of-fold Dice "
        "(nnU-Net's rule)")


def _cv_folder(options: TrainOptions) -> Path:
    if options.out:
        return Path(options.out)
    task = str(options.task)
    name = Path(task).stem if task.endswith((".yaml", ".yml", ".json")) else task
    return Path("runs", name, "cv-" + datetime.now().strftime("%Y%m%d-%H%M%S"))


def _check_marker(folder: Path, options: TrainOptions) -> None:
    """Write crossval.json, or check that the folder's folds and seed are those asked for now."""
    path = folder / CROSSVAL_NAME
    wanted = {"folds": options.folds, "seed": options.seed}
    if path.is_file():
        saved = json.loads(path.read_text())
        if {k: saved.get(k) for k in wanted} != wanted:
            raise InputError(f"{folder}: holds a cross-validation with --folds {saved.get('folds')} --seed "
                             f"{saved.get('seed')}; pass those, or choose another --out")
        return
    if (folder / CONFIG_NAME).is_file():
        raise InputError(f"{folder}: is a single model folder; choose another --out for a cross-validation")
    write_text(json.dumps({**wanted, "task": str(options.task), "data": str(options.data or "")}, indent=2),
               path)


def _check_fold(folder: Path, options: TrainOptions, fold: int) -> None:
    wanted = {"folds": options.folds, "fold": fold, "seed": options.seed}
    saved = read_run_config(folder).folds
    if {k: saved.get(k) for k in wanted} != wanted:
        raise InputError(f"{folder}: was trained as fold {saved.get('fold')} of {saved.get('folds')} (seed "
                         f"{saved.get('seed')}), not fold {fold} of {options.folds} (seed {options.seed})")


def fit_folds(options: TrainOptions, echo: Callable[[str], None] = print) -> Path:
    """Train every fold of `options.folds` in turn (resuming any stopped), then `summarise`; returns the folder."""
    folder = _cv_folder(options)
    folder.mkdir(parents=True, exist_ok=True)
    _check_marker(folder, options)
    for fold in range(options.folds):
        sub = folder / f"fold_{fold}"
        if (sub / CONFIG_NAME).is_file():
            _check_fold(sub, options, fold)
        resume = (sub / "last.pt").is_file()
        echo(f"fold {fold} of {options.folds}: {'continuing' if resume else 'training'} {sub}")
        fit(replace(options, fold=fold, out=sub, resume=resume, calibrate=False))  # calibrated out of fold below
    summarise(folder, device=options.device, precision=options.precision, echo=echo)
    return folder


# ------------------------------------------------------------------------------ out-of-fold


def _dice(reference: np.ndarray, prediction: np.ndarray) -> float | None:
    from medseg.evaluate.metrics import confusion, dice

    tp, fp, fn, _ = confusion(reference, prediction)
    value = dice(tp, fp, fn)
    return None if math.isnan(value) else round(value, 6)


def _score_case(seg, reference: np.ndarray, task: Task, contoured: Sequence[str] | None) -> dict:
    """Per organ: Dice raw and with its largest piece only, confidence, volumes (None: organ not contoured)."""
    from medseg.infer.postprocess import keep_largest_component

    largest = keep_largest_component(seg.labels, list(task.label_names))
    volumes = seg.volumes()
    scores = {}
    for label_id, organ in task.label_names.items():
        if contoured is not None and organ not in contoured:
            continue
        reference_organ = reference == label_id
        scores[organ] = {"dice_raw": _dice(reference_organ, seg.labels == label_id),
                         "dice_largest": _dice(reference_organ, largest == label_id),
                         **(seg.confidence.get(organ) or {}), "volume_ml": round(volumes[organ]["volume_ml"], 4),
                         "reference_ml": round(float(reference_organ.sum()) * seg.grid.voxel_volume_ml, 4)}
    return scores


def _checkpoint_id(folder: Path) -> str:
    """Which weights a fold predicts with (its best.pt's time and size): out-of-fold predictions made with
    other weights (the fold trained on since) are made again."""
    weights = folder / "best.pt" if (folder / "best.pt").is_file() else folder / "last.pt"
    stat = weights.stat()
    return f"{weights.name}:{stat.st_mtime_ns}:{stat.st_size}"


def _done(path: Path, checkpoint: str) -> bool:
    try:
        return json.loads(path.read_text()).get("checkpoint") == checkpoint
    except (OSError, ValueError):
        return False


def _predict_held_out(predictor, case: Case, fold: int, task: Task, out: Path, checkpoint: str) -> dict:
    """One held-out case: raw mask, probabilities and scores written to `out` (the .json last: it marks the
    case done, with the weights that predicted it)."""
    seg = predictor.predict(list(case.images), keep_probabilities=True)
    reference, grid = read_label(case.label, task.dimensions)
    if not grid.matches(seg.grid):
        raise InputError(f"{case.label}: label grid ({grid.describe()}) differs from its image's "
                         f"({seg.grid.describe()})")
    result = {"case": case.name, "fold": fold, "checkpoint": checkpoint,
              "organs": _score_case(seg, reference, task, case.contoured)}
    write_label_map(seg.labels, seg.grid, out / f"{case.name}_seg.nii.gz")
    for label_id, organ in task.label_names.items():
        write_image(seg.probabilities[label_id], seg.grid, out / f"{case.name}_prob_{organ}.nii.gz")
    write_text(json.dumps(result, indent=2), out / f"{case.name}.json")
    return result


def predict_out_of_fold(folder: Path, device: str = "auto", precision: str = "auto",
                        echo: Callable[[str], None] = print, data: Path | None = None) -> list[dict]:
    """Every fold's held-out cases predicted by that fold (done ones read back); one result per case.

    Args:
        data: the dataset of the cases still to predict; None: the one each fold was trained on.
    """
    from medseg.infer.ensemble import EnsemblePredictor, fold_folders

    out = folder / OOF_FOLDER
    results: dict[str, dict] = {}
    for fold_folder in fold_folders(folder):
        config = read_run_config(fold_folder)
        fold = config.folds.get("fold", len(results))
        held_out = [name for name in config.split["validation"] if name not in results]
        checkpoint = _checkpoint_id(fold_folder)
        todo = [name for name in held_out if not _done(out / f"{name}.json", checkpoint)]
        if todo:
            cases = {c.name: c for c in load_dataset(data or config.data)}
            predictor = EnsemblePredictor([fold_folder], device=device, precision=precision, largest_component=())
            echo(f"fold {fold}: predicting {len(todo)} held-out case(s) into {out}")
            for name in todo:
                results[name] = _predict_held_out(predictor, cases[name], fold, config.task, out, checkpoint)
        for name in held_out:
            results.setdefault(name, json.loads((out / f"{name}.json").read_text()))
    if not results:
        raise InputError(f"{folder}: no fold model folders (fold_<k>/config.json) to summarise")
    return [results[name] for name in sorted(results)]


# -------------------------------------------------------------------------------- the choice


def choose_postprocessing(results: Sequence[Mapping], organs: Sequence[str], task_file: Sequence[str] = ()) -> dict:
    """Keep-largest-piece per organ, as nnU-Net chooses it: on when it does not lower the organ's mean
    out-of-fold Dice (cases where the organ is absent from both masks are left out); off for an organ
    no case has.

    Returns:
        {"largest_component": [organs on], "rule", "organs": {organ: {"enabled", "dice_raw",
        "dice_largest", "cases"}}, "task_file": the task file's list, for comparison}.
    """
    decisions = {}
    for organ in organs:
        pairs = [(r["organs"][organ]["dice_raw"], r["organs"][organ]["dice_largest"]) for r in results
                 if organ in r["organs"] and r["organs"][organ]["dice_raw"] is not None]
        if not pairs:
            decisions[organ] = {"enabled": False, "dice_raw": None, "dice_largest": None, "cases": 0}
            continue
        raw, largest = (float(np.mean(values)) for values in zip(*pairs))
        decisions[organ] = {"enabled": bool(largest >= raw), "dice_raw": round(raw, 6),
                            "dice_largest": round(largest, 6), "cases": len(pairs)}
    return {"largest_component": [o for o in organs if decisions[o]["enabled"]], "rule": RULE,
            "organs": decisions, "task_file": list(task_file)}


def _case_rows(results: Sequence[Mapping], chosen: Sequence[str]) -> list[dict]:
    """Long form: one row per case and organ, with the Dice of the chosen post-processing."""
    rows = []
    for result in results:
        for organ, scores in result["organs"].items():
            dice = scores["dice_largest"] if organ in chosen else scores["dice_raw"]
            rows.append({"case": result["case"], "fold": result["fold"], "organ": organ, "dice": dice, **scores})
    return rows


def _spearman(rows: Sequence[Mapping], score: str) -> dict:
    from scipy.stats import spearmanr

    pairs = [(r[score], r["dice"]) for r in rows if r.get(score) is not None and r["dice"] is not None]
    if len(pairs) < 3 or len({p[0] for p in pairs}) < 2 or len({p[1] for p in pairs}) < 2:
        return {"rho": None, "n": len(pairs)}
    rho = spearmanr(*zip(*pairs)).statistic
    return {"rho": None if math.isnan(rho) else round(float(rho), 4), "n": len(pairs)}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.mean(values)), 6) if values else None


def _fold_table(rows: Sequence[Mapping], organs: Sequence[str]) -> dict:
    """Per fold and organ: mean Dice (chosen post-processing) and raw, over that fold's held-out cases."""
    table: dict = {}
    for fold in sorted({r["fold"] for r in rows}):
        table[str(fold)] = {organ: {key: _mean([r[source] for r in rows if r["fold"] == fold and r["organ"] == organ])
                                    for key, source in (("dice", "dice"), ("dice_raw", "dice_raw"))}
                            for organ in organs}
    return table


def _write_csv(rows: Sequence[Mapping], columns: Sequence[str], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: ("" if row.get(k) is None else row.get(k)) for k in columns} for row in rows)
    write_text(buffer.getvalue(), path)


def summarise(folder: str | Path, device: str = "auto", precision: str = "auto",
              echo: Callable[[str], None] = print) -> dict:
    """Out-of-fold predictions, the post-processing choice and the summary files of a cross-validation folder."""
    from medseg.infer.ensemble import POSTPROCESSING_NAME
    from medseg.infer.uncertainty import CONFIDENCE_SCORE, SCORES

    folder = Path(folder)
    results = predict_out_of_fold(folder, device, precision, echo)
    task = read_run_config(next(folder.glob("fold_*/" + CONFIG_NAME)).parent).task
    organs = list(task.label_names.values())
    choice = choose_postprocessing(results, organs, task.inference.largest_component)
    write_text(json.dumps(choice, indent=2), folder / POSTPROCESSING_NAME)
    rows = _case_rows(results, choice["largest_component"])
    per_fold = _fold_table(rows, organs)
    summary = {"task": task.name, "folds": len(per_fold), "cases": len(results), "per_fold": per_fold,
               "organs": {}, "postprocessing": choice, "oof_folder": OOF_FOLDER,
               "confidence_score": CONFIDENCE_SCORE,
               "confidence_vs_dice": {s: _spearman(rows, s) for s in SCORES}}
    for organ in organs:
        values = [per_fold[f][organ]["dice"] for f in per_fold if per_fold[f][organ]["dice"] is not None]
        summary["organs"][organ] = {"mean": _mean(values), "std": round(float(np.std(values)), 6) if values else None,
                                    "oof_mean": _mean([r["dice"] for r in rows if r["organ"] == organ]),
                                    "largest_component": organ in choice["largest_component"]}
    write_text(json.dumps(summary, indent=2), folder / SUMMARY_NAME)
    _calibrate(folder, rows, organs, task.inference.tta)
    table = [{"fold": f, "organ": o, **v} for f, by_organ in per_fold.items() for o, v in by_organ.items()]
    table += [{"fold": stat, "organ": o, "dice": s[stat]} for stat in ("mean", "std") for o, s in summary["organs"].items()]
    _write_csv(table, ["fold", "organ", "dice", "dice_raw"], folder / "cv_summary.csv")
    _write_csv(rows, ["case", "fold", "organ", "dice", "dice_raw", "dice_largest", *SCORES,
                      "volume_ml", "reference_ml"], folder / "cv_cases.csv")
    for line in format_summary(summary):
        echo(line)
    return summary


def _calibrate(folder: Path, rows: Sequence[Mapping], organs: Sequence[str], tta: bool) -> dict:
    """confidence.json from the out-of-fold organ-case rows (Dice with the chosen post-processing); `tta`: the
    task's inference.tta, which the out-of-fold predictions followed."""
    from medseg.infer.calibration import calibrate_rows, write_calibration
    from medseg.infer.uncertainty import CONFIDENCE_SCORE, ESTIMATE_SCORE

    pairs = [{"case": r["case"], "organ": r["organ"], "confidence": r.get(CONFIDENCE_SCORE), "dice": r["dice"],
              ESTIMATE_SCORE: r.get(ESTIMATE_SCORE)} for r in rows]
    folds = len({r["fold"] for r in rows})
    data = calibrate_rows(pairs, organs, f"out-of-fold predictions of {folds} folds ({len({r['case'] for r in rows})}"
                          " cases, each predicted by the fold that did not train on it)", tta=tta)
    write_calibration(data, folder)
    return data


def calibrate_folds(folder: str | Path, device: str = "auto", precision: str = "auto", data: Path | None = None,
                    echo: Callable[[str], None] = print) -> dict:
    """A cross-validation folder's confidence.json alone, from its out-of-fold predictions (those missing made
    first, as `summarise` makes them); returns its data."""
    from medseg.infer.ensemble import read_postprocessing

    folder = Path(folder)
    results = predict_out_of_fold(folder, device, precision, echo, data)
    task = read_run_config(next(folder.glob("fold_*/" + CONFIG_NAME)).parent).task
    organs = list(task.label_names.values())
    chosen = read_postprocessing(folder)
    kept = chosen[0] if chosen else choose_postprocessing(results, organs)["largest_component"]
    return _calibrate(folder, _case_rows(results, kept), organs, task.inference.tta)


def format_summary(summary: Mapping) -> list[str]:
    """The summary as terminal lines: Dice per organ (mean ± std over folds) and the post-processing choice."""
    lines = [f"cross-validation of '{summary['task']}': {summary['folds']} folds, {summary['cases']} out-of-fold cases"]
    for organ, stats in summary["organs"].items():
        dice = "n/a" if stats["mean"] is None else f"{stats['mean']:.3f} ± {stats['std']:.3f}"
        lines.append(f"  {organ:<22} Dice {dice}   largest piece only: {'yes' if stats['largest_component'] else 'no'}")
    rho = summary["confidence_vs_dice"][summary["confidence_score"]]["rho"]
    lines.append(f"  confidence ({summary['confidence_score']}) vs Dice: Spearman rho "
                 + ("n/a" if rho is None else f"{rho:.2f}"))
    return lines
