"""Per-organ confidence thresholds for the QA flags, chosen on cases the model did not train on.

An organ's confidence (`medseg.infer.uncertainty`: the mean probability where it wins) depends on the
organ: on the head-and-neck CTs a single model's good esophagus sits near 0.87 and its good parotids
near 0.93, while a bad spinal cord can reach 0.90, so one global threshold (`qa.LOW_CONFIDENCE`)
misses most bad organs. As nnU-Net picks its post-processing from out-of-fold predictions, the
threshold of each organ is chosen from the run's validation cases, predicted as `medseg predict
--uncertainty` would (the same `EnsemblePredictor`, post-processing and confidence; test-time flips only
when asked), scored by Dice on the organs each case contoured, and kept in the model folder as
`confidence.json` (per organ: the cases' confidences and Dices, the threshold and how it was chosen).
A cross-validation folder pools its folds' out-of-fold predictions (`medseg.train.crossval`).

**The rule** (`organ_threshold`), per organ, over the validation cases that contoured it and where
it was predicted (a failure has Dice < FAILED_DICE = 0.5, what the QA flags must find; a good case
Dice >= GOOD_DICE = 0.7, the QA benchmark's precision bar):

    threshold = max(the highest confidence of a failure          (1-4 failures), or
                    the 90th percentile of the failures' confidences (>= 5 failures),
                    the 10th percentile of the good cases' confidences   (>= 3 good cases), else 0.8)
    rounded up to the next 0.001 above, at most 0.99;
    no failure and fewer than 3 good cases: no threshold (LOW_CONFIDENCE, 0.8, applies)

Why: with a handful of cases nothing finer can be fitted. One confident failure on an unseen case
shows that confidence up to that level does not vouch for this organ, so everything up to it is
flagged (recall is what the global threshold lacked). With many cases, the highest confidence of any
failure is an extreme that sits at the top of the good cases too: on the 170 out-of-fold cases of a
3-fold head-and-neck cross-validation (the highest of all Dice < 0.7 cases, as this rule was first
written) it flagged 174 of the 176 held-out organ-cases. The 90th percentile of the failures flags
nine in ten of them on the validation cases, above the recall goal of 0.8, and leaves most good cases
alone. Without failures, the organ's own typical confidence is the measure: below the 10th percentile
of its good cases is less sure than nearly every case that came out well, at the cost of ~10 % of good
cases flagged, which the precision goal (half of the flagged below Dice 0.7) affords. Fewer than three
good cases cannot place a percentile, so the global default stands in for it there. A threshold of 1
would flag every case, hence the 0.99 cap.

A cross-validation folder predicts with the ensemble of its folds but is calibrated on single folds'
out-of-fold confidences (no case is unseen by the whole ensemble); an ensemble's confidence is therefore
the members' mean of their own (`medseg.infer.uncertainty`), on the scale the thresholds were chosen on.

**Estimated Dice.** The same cases also fit, per organ, a straight line from the organ's expected Dice
(`medseg.infer.uncertainty`: what its probabilities say its mask would score) to the Dice it scored
(least squares, the slope kept >= 0, at least MIN_FIT_CASES cases). Raw scores rank cases within one
organ but not across organs: a sure esophagus scores lower than a doubtful mandible, while the
esophagus fails far more often. The line puts every organ on the Dice scale: on the 898 out-of-fold
organ-cases of a 3-fold head-and-neck cross-validation, Spearman's rho against Dice went from 0.39
(mean probability) and 0.42 (expected Dice) to 0.58 (the line fitted on the other folds' cases); the
organ's mean Dice alone, with no per-case score, reaches 0.45.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import InputError
from medseg.infer.qa import LOW_CONFIDENCE
from medseg.infer.uncertainty import CONFIDENCE_SCORE, ESTIMATE_SCORE
from medseg.io import write_text
from medseg.model.folder import read_folder_json

CALIBRATION_NAME = "confidence.json"  # in a model folder or a cross-validation folder
FAILED_DICE = 0.5  # a validation case below this Dice is a failure the flag should have caught
GOOD_DICE = 0.7  # ... at or above this, a good case
MANY_FAILURES = 5  # this many failures or more: a percentile of theirs, not the highest
FAILURE_QUANTILE = 0.90  # ... flag below this percentile of the failures' confidences
QUANTILE = 0.10  # without failures: flag below this percentile of the good cases' confidences
MIN_GOOD_CASES = 3  # fewer good cases than this cannot place the percentile: LOW_CONFIDENCE stands in
MAX_THRESHOLD = 0.99  # a threshold of 1 would flag every case
# The calibration at the end of training is budgeted as twice the validation time of one case more than
# it predicts (loading the model, where OpenVINO converts it on a CPU and caches it for `medseg predict`;
# each case read, resampled and its probabilities carried to the scan's grid, where validation works on
# cached model-grid volumes). Head-and-neck CTs, UNet 16-256, one thread of the shared 2-core machine:
# loading 2.7 s (torch) or 11.3 s (OpenVINO), then 0.4-1.8 s a case; validation ~1.1 s a case.
COST_PER_VALIDATION_CASE = 2.0
MIN_FIT_CASES = 10  # fewer validation cases than this: no estimated Dice for the organ
RULE = ("per organ: the highest confidence of a validation case with Dice < 0.5 (with 5 or more such cases, the "
        "90th percentile of theirs), or, if higher, the 10th percentile of the confidences of cases with Dice "
        ">= 0.7 (the default 0.8 instead with fewer than 3 of them); rounded up to the next 0.001 above, at most 0.99")


def _above(value: float) -> float:
    """The next 0.001 strictly above `value`: 'below 0.902' flags a case at 0.9012, and one at 0.901. Finer
    than 0.01: one model's organs can sit within 0.02 of each other (0.92-0.96 on the head-and-neck CTs)."""
    return round(math.floor(round(value * 1000, 6)) / 1000 + 0.001, 3)


def organ_threshold(confidences: Sequence[float | None], dices: Sequence[float | None]) -> tuple[float | None, str]:
    """One organ's threshold from its validation cases (the module's rule), and how it was chosen.

    Args:
        confidences: per case, the organ's confidence; None where it was predicted nowhere (left out:
            the `missing` check covers those).
        dices: per case, the organ's Dice; None where it is absent from both masks (left out).
    Returns:
        (threshold, basis); threshold None where no case has both values (the default then applies).
    """
    pairs = [(c, d) for c, d in zip(confidences, dices) if c is not None and d is not None]
    bad = [c for c, d in pairs if d < FAILED_DICE]
    good = [c for c, d in pairs if d >= GOOD_DICE]
    if not pairs:
        return None, "no validation case both contoured and predicted it"
    parts = []
    if len(bad) >= MANY_FAILURES:
        worst = float(np.quantile(bad, FAILURE_QUANTILE))
        parts.append((_above(worst), f"the {FAILURE_QUANTILE * 100:.0f}th percentile of {len(bad)} case(s) with "
                                     f"Dice < {FAILED_DICE} ({worst:.3f})"))
    elif bad:
        worst = max(bad)
        parts.append((_above(worst),
                      f"the highest confidence of {len(bad)} case(s) with Dice < {FAILED_DICE} ({worst:.3f})"))
    if len(good) >= MIN_GOOD_CASES:
        quantile = float(np.quantile(good, QUANTILE))
        parts.append((_above(quantile),
                      f"the {QUANTILE * 100:.0f}th percentile of {len(good)} good cases ({quantile:.3f})"))
    elif bad:
        parts.append((LOW_CONFIDENCE, f"the default {LOW_CONFIDENCE} (fewer than {MIN_GOOD_CASES} good cases)"))
    if not parts:
        return None, f"{len(good)} case(s), none bad: too few for a percentile"
    threshold, basis = max(parts, key=lambda part: part[0])
    if threshold > MAX_THRESHOLD:
        return MAX_THRESHOLD, f"{basis}, capped at {MAX_THRESHOLD}"
    return threshold, basis


def dice_fit(scores: Sequence[float | None], dices: Sequence[float | None]) -> dict | None:
    """One organ's line from expected Dice to Dice (module docstring); None under MIN_FIT_CASES pairs."""
    pairs = np.array([(c, d) for c, d in zip(scores, dices) if c is not None and d is not None], dtype=float)
    if len(pairs) < MIN_FIT_CASES:
        return None
    slope = 0.0
    if np.ptp(pairs[:, 0]) > 0:
        slope = max(float(np.polyfit(pairs[:, 0], pairs[:, 1], 1)[0]), 0.0)  # never: surer, so worse
    intercept = float(pairs[:, 1].mean() - slope * pairs[:, 0].mean())
    return {"intercept": round(intercept, 4), "slope": round(slope, 4), "cases": len(pairs)}


# ------------------------------------------------------------------------------- the file


@dataclass(frozen=True)
class Calibration:
    """A model's per-organ confidence thresholds (confidence.json), as the QA checks use them."""

    organs: Mapping[str, Mapping]  # organ -> {"threshold": float | None, "basis", "cases", ...}
    source: str  # which predictions it was chosen from
    tta: bool = False  # whether those predictions had test-time flips

    def threshold(self, organ: str) -> tuple[float, str]:
        """The organ's threshold, and the words for a flag's reason; LOW_CONFIDENCE where it has none."""
        entry = self.organs.get(organ)
        if entry is None:
            return LOW_CONFIDENCE, "the default; the calibration does not cover this organ"
        if entry.get("threshold") is None:
            return LOW_CONFIDENCE, f"the default; the calibration has {entry.get('basis', 'no threshold for it')}"
        return entry["threshold"], f"the organ's threshold from {entry['cases']} validation cases"

    def estimated_dice(self, organ: str, expected_dice: float | None) -> float | None:
        """The organ's Dice estimated from its expected Dice by the fitted line; None without one."""
        fit = (self.organs.get(organ) or {}).get("dice_fit")
        if fit is None or expected_dice is None:
            return None
        return round(min(max(fit["intercept"] + fit["slope"] * expected_dice, 0.0), 1.0), 3)

    def add_estimates(self, confidence: Mapping[str, dict]) -> None:
        """Each organ's scores (`medseg.infer.uncertainty.organ_confidence`) get its "estimated_dice",
        where the organ has a fitted line and a score to put on it."""
        for organ, scores in confidence.items():
            estimate = self.estimated_dice(organ, scores.get(ESTIMATE_SCORE))
            if estimate is not None:
                scores["estimated_dice"] = estimate

    def report(self) -> dict:
        """For summary.json: the thresholds and where they came from."""
        return {"source": self.source, "tta": self.tta,
                "thresholds": {organ: entry.get("threshold") for organ, entry in self.organs.items()}}


def calibrate_rows(rows: Sequence[Mapping], organs: Sequence[str], source: str, tta: bool = False,
                   seconds: float | None = None) -> dict:
    """confidence.json's data from organ-case rows ({"case", "organ", "confidence", "dice", and optionally
    ESTIMATE_SCORE}).

    Each organ keeps its cases' names, confidences and Dices beside the threshold, so the choice can
    be checked, or made again by another rule, from the file alone.
    """
    chosen = {}
    for organ in organs:
        mine = [r for r in rows if r["organ"] == organ]
        threshold, basis = organ_threshold([r["confidence"] for r in mine], [r["dice"] for r in mine])
        chosen[organ] = {"threshold": threshold, "basis": basis,
                         "cases": sum(1 for r in mine if r["confidence"] is not None and r["dice"] is not None),
                         "case_names": [r["case"] for r in mine], "confidence": [r["confidence"] for r in mine],
                         "dice": [r["dice"] for r in mine],
                         ESTIMATE_SCORE: [r.get(ESTIMATE_SCORE) for r in mine],
                         "dice_fit": dice_fit([r.get(ESTIMATE_SCORE) for r in mine], [r["dice"] for r in mine])}
    return {"rule": RULE, "score": CONFIDENCE_SCORE, "failed_dice": FAILED_DICE, "good_dice": GOOD_DICE,
            "many_failures": MANY_FAILURES, "failure_quantile": FAILURE_QUANTILE, "quantile": QUANTILE,
            "min_good_cases": MIN_GOOD_CASES, "max_threshold": MAX_THRESHOLD, "default": LOW_CONFIDENCE,
            "source": source, "tta": tta, "cases": sorted({r["case"] for r in rows}),
            "seconds": None if seconds is None else round(seconds, 3), "organs": chosen}


def write_calibration(data: Mapping, folder: str | Path) -> Path:
    return write_text(json.dumps(data, indent=2), Path(folder) / CALIBRATION_NAME)


def read_calibration(folder: str | Path) -> Calibration | None:
    """A model (or cross-validation) folder's confidence.json; None where it has none."""
    path = Path(folder) / CALIBRATION_NAME
    if not path.is_file():
        return None
    raw = read_folder_json(path)
    organs = raw.get("organs") if isinstance(raw, dict) else None
    if not isinstance(organs, dict) or not all(isinstance(e, dict) and "threshold" in e for e in organs.values()):
        raise InputError(f"{path}: 'organs' must map organ names to entries with a 'threshold'")
    return Calibration(organs, str(raw.get("source", "")), bool(raw.get("tta", False)))


def format_calibration(data: Mapping) -> list[str]:
    """confidence.json as terminal lines: one per organ."""
    lines = [f"confidence thresholds from {data['source']}:"]
    for organ, entry in data["organs"].items():
        value = "default " + str(LOW_CONFIDENCE) if entry["threshold"] is None else f"{entry['threshold']:.3f}"
        lines.append(f"  {organ:<22} {value:<12} {entry['cases']} case(s): {entry['basis']}")
        fit = entry.get("dice_fit")
        if fit:
            lines.append(f"  {'':<22} estimated Dice = {fit['intercept']:.3f} + {fit['slope']:.3f} x expected Dice "
                         f"({fit['cases']} cases)")
    return lines


# ------------------------------------------------------------------------ the predictions


def score_case(seg, reference: np.ndarray, name: str, contoured: Sequence[str] | None) -> list[dict]:
    """One row per organ the case contoured: its Dice (None: absent from both masks) and confidence.

    Each organ is compared inside the box holding it in either mask, not over the whole scan.
    """
    from medseg.evaluate.metrics import confusion, dice
    from medseg.geometry import label_boxes

    top = max(seg.organs)
    boxes = label_boxes(reference, max_label=top), label_boxes(seg.labels, max_label=top)
    rows = []
    for label_id, organ in seg.organs.items():
        if contoured is not None and organ not in contoured:
            continue
        found = [b[label_id - 1] for b in boxes if label_id - 1 < len(b) and b[label_id - 1] is not None]
        box = tuple(slice(min(s.start for s in axis), max(s.stop for s in axis)) for axis in zip(*found))
        value = dice(*confusion(reference[box] == label_id, seg.labels[box] == label_id)[:3]) if found else math.nan
        rows.append({"case": name, "organ": organ, "dice": None if math.isnan(value) else round(value, 4),
                     "confidence": (seg.confidence.get(organ) or {}).get(CONFIDENCE_SCORE),
                     ESTIMATE_SCORE: (seg.confidence.get(organ) or {}).get(ESTIMATE_SCORE)})
    return rows


def predict_rows(predictor, cases: Sequence, echo: Callable[[str], None] = print) -> list[dict]:
    """Every case predicted by `predictor` (an `EnsemblePredictor`: it computes the confidence) and scored."""
    from medseg.io import read_label

    rows = []
    for case in cases:
        seg = predictor.predict(list(case.images))
        reference, grid = read_label(case.label, predictor.task.dimensions)
        if not grid.matches(seg.grid):
            raise InputError(f"{case.label}: label grid ({grid.describe()}) differs from its image's "
                             f"({seg.grid.describe()})")
        rows += score_case(seg, reference, case.name, case.contoured)
        echo(f"  {case.name}: " + ", ".join(f"{r['organ']} {_pair(r)}" for r in rows if r["case"] == case.name))
    return rows


def _pair(row: Mapping) -> str:
    confidence = "-" if row["confidence"] is None else f"{row['confidence']:.2f}"
    return f"{confidence}/{'-' if row['dice'] is None else format(row['dice'], '.2f')}"


def unseen_cases(folders: Sequence[str | Path], data: str | Path | None = None) -> list:
    """The validation cases of every model folder in `folders` that none of them trained on, from `data`
    (default: the first folder's dataset), as `medseg.data.datasets.Case`s with their `contoured` organs."""
    from medseg.data.datasets import load_dataset
    from medseg.model.folder import read_run_config

    configs = [read_run_config(f) for f in folders]
    trained = {name for config in configs for name in config.split["train"]}
    names = [n for n in configs[0].split["validation"] if n not in trained
             and all(n in c.split["validation"] for c in configs[1:])]
    if not names:
        raise InputError(f"{folders[0]}: no validation case that the model did not train on (its split's "
                         f"validation cases are also training cases); nothing to calibrate on")
    data = Path(data or configs[0].data)
    cases = {case.name: case for case in load_dataset(data)}
    missing = [n for n in names if n not in cases or cases[n].label is None]
    if missing:
        raise InputError(f"{data}: lacks the labelled validation case(s) {', '.join(missing[:3])} of "
                         f"{folders[0]}'s split; pass the dataset it was trained on (--data)")
    return [cases[n] for n in names]


def calibrate_model(folder: str | Path, data: str | Path | None = None, device: str = "auto",
                    precision: str = "auto", tta: bool | None = None, echo: Callable[[str], None] = print,
                    backend: str = "auto") -> dict:
    """Predict a model folder's validation cases, choose its thresholds and write its confidence.json.

    Args:
        data: the dataset holding the validation cases; None: the one the folder was trained on.
        tta: test-time flips; None: as `medseg predict` does by default (the task's `inference.tta`).
    Returns:
        confidence.json's data ("seconds": loading the model and predicting the cases).
    """
    from medseg.infer.ensemble import EnsemblePredictor

    cases = unseen_cases([folder], data)
    start = time.perf_counter()
    predictor = EnsemblePredictor([folder], device=device, tta=tta, precision=precision, backend=backend)
    flips = predictor.members[0].tta
    echo(f"calibrating confidence on {len(cases)} validation case(s) of {folder} (confidence/Dice; model loaded "
         f"in {time.perf_counter() - start:.1f} s):")
    rows = predict_rows(predictor, cases, echo)
    source = (f"{len(cases)} validation case(s) of the run's split, predicted by its best.pt"
              f"{' with test-time flips' if flips else ''}")
    data = calibrate_rows(rows, list(predictor.task.label_names.values()), source, flips, time.perf_counter() - start)
    write_calibration(data, folder)
    return data


def reserve_seconds(validation_seconds: float, config) -> float:
    """What the calibration at the end of a training run will cost, from the time of one validation."""
    schedule = config.task.schedule
    validated = len(config.split["validation"][:schedule.validation_cases]) or 1
    to_calibrate = len([n for n in config.split["validation"] if n not in config.split["train"]])
    return validation_seconds / validated * (to_calibrate + 1) * COST_PER_VALIDATION_CASE if to_calibrate else 0.0


def calibrate_after_training(folder: Path, device: str, precision: str, log, cost=None) -> None:
    """`calibrate_model` at the end of `medseg train`, logged; a run without cases to calibrate on (or
    whose dataset moved) keeps its weights and says how to calibrate later.

    Args:
        cost: the run's measured validation cost (`medseg.train.validation.ValidationCost`), in a budgeted
            run: its backend serves here too. Otherwise torch: converting for OpenVINO (11 s for the
            head-and-neck UNet) would cost more than the handful of cases, and `medseg calibrate` can
            calibrate through OpenVINO afterwards, as `medseg predict` runs on a CPU.
    """
    try:
        data = calibrate_model(folder, device=device, precision=precision, echo=log.info,
                               backend=cost.backend if cost else "torch")
    except InputError as error:
        log.info(f"no confidence calibration ({error}); later: `medseg calibrate {folder} --data DATASET`")
        return
    per_case = data["seconds"] / max(len(data["cases"]), 1)
    log.info(f"wrote {folder / CALIBRATION_NAME}: per-organ confidence thresholds from {len(data['cases'])} "
             f"validation case(s) in {data['seconds']:.1f} s ({per_case:.1f} s a case)")
