"""`medseg evaluate`: match the files, score every pair, write the report.

References are a mask file, a folder of masks, or a dataset folder. With a dataset, an organ a case did
not contour (its `contoured` list, partial labels) is skipped for that case: no rows, not counted in
any mean.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from medseg.config import load_task, read_labels_file
from medseg.errors import InputError
from medseg.evaluate.cases import DEFAULT_TOLERANCE_MM, Tolerance, evaluate_pairs
from medseg.evaluate.matching import is_dataset_folder, match_cases, match_dataset
from medseg.evaluate.report import write_report


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def run_evaluation(pred: str | Path, ref: str | Path, out: str | Path, task: str | Path | None = None,
                   labels: str | Path | None = None, tolerance_mm: Tolerance = DEFAULT_TOLERANCE_MM,
                   warn: Callable[[str], None] = _stderr) -> dict[str, dict[str, dict]]:
    """`medseg evaluate`: match files, evaluate every pair, write the report into `out`.

    Args:
        pred, ref: two mask files, or two folders matched by case name; or a folder of predictions and
            a dataset folder (see `match_dataset`), whose organs not contoured in a case are skipped.
        out: output folder (metrics.csv, summary.json, dice_boxplot.png).
        task: task name or file giving organ names; or
        labels: JSON/YAML file of label id -> organ name. Neither: the dataset.json's labels when `ref`
            is a dataset that has them, else organs are `label_<value>`.
        tolerance_mm: surface Dice tolerance in mm, or organ name -> tolerance.
        warn: receives one line per problem that does not stop the evaluation (missing partners).

    Returns:
        The summary written to summary.json.
    """
    if task is not None and labels is not None:
        raise InputError("give organ names with --task or with --labels, not both")
    organs = None
    if task is not None:
        organs = load_task(task).label_names
    elif labels is not None:
        organs = read_labels_file(labels)
    not_contoured: dict[str, set[str]] = {}
    if Path(ref).is_dir() and is_dataset_folder(ref):
        pairs, lone_preds, contoured = match_dataset(pred, ref)
        lone_refs: list[str] = []
        if organs is None and (Path(ref) / "dataset.json").is_file():
            organs = read_labels_file(Path(ref) / "dataset.json")
        if organs is None and any(c is not None for c in contoured.values()):
            raise InputError(f"{ref}: cases list 'contoured' organs by name; give --task or --labels to name the "
                             "label values")
        from medseg.data.partial import uncontoured_organs  # torch: only for datasets that need it

        not_contoured = {case: uncontoured_organs(c, organs) for case, c in contoured.items() if c is not None}
    else:
        pairs, lone_preds, lone_refs = match_cases(pred, ref)
    if lone_preds or lone_refs:
        parts = []
        if lone_preds:
            parts.append(f"{len(lone_preds)} prediction(s) in {pred} without a reference: "
                         + ", ".join(lone_preds))
        if lone_refs:
            parts.append(f"{len(lone_refs)} reference(s) in {ref} without a prediction: "
                         + ", ".join(lone_refs))
        warn("warning: " + "; ".join(parts) + " (skipped)")
    if not pairs:
        raise InputError(f"no prediction in {pred} matches a reference in {ref} by case name "
                         f"(unmatched predictions: {', '.join(lone_preds[:5]) or 'none'}; "
                         f"references: {', '.join(lone_refs[:5]) or 'none'})")
    rows = evaluate_pairs(pairs, organs, tolerance_mm, not_contoured)
    return write_report(rows, out)
