"""`medseg evaluate`: match the files, score every pair, write the report.

References are a mask file, a folder of masks, or a dataset folder. With a dataset, an organ a case did
not contour (its `contoured` list, partial labels) is skipped for that case: no rows, not counted in
any mean. Besides the volume metrics, every pair is measured slice by slice (`medseg.evaluate.slices`):
slices.csv, a profile plot per case and the worst slices in summary.json; 2D images (one slice) have
none, and summary.json says so (`all` -> `slices`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from medseg.config import CASE_ORGAN, Task, load_task, read_labels_file
from medseg.errors import InputError
from medseg.evaluate import slices
from medseg.evaluate.cases import Tolerance, evaluate_case, evaluate_pairs, surface_tolerances, task_tolerances
from medseg.evaluate.matching import Pair, is_dataset_folder, match_cases, match_dataset
from medseg.evaluate.profile import write_profiles
from medseg.evaluate.report import Row, write_report
from medseg.io import Grid
from medseg.planar import is_planar


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _pairs(pred: str | Path, ref: str | Path, organs: dict[int, str] | None,
           warn: Callable[[str], None]) -> tuple[list[Pair], dict[int, str] | None, dict[str, set[str]]]:
    """(case, prediction, reference) triples, the organ names (a dataset's own when none were given), and
    case -> organs its reference did not contour."""
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
    return pairs, organs, not_contoured


def run_evaluation(pred: str | Path, ref: str | Path, out: str | Path, task: str | Path | None = None,
                   labels: str | Path | None = None, tolerance_mm: Tolerance | None = None,
                   warn: Callable[[str], None] = _stderr, instances: str | Path | None = None) -> dict[str, dict[str, dict]]:
    """`medseg evaluate`: match files, evaluate every pair, write the report into `out`.

    Args:
        pred, ref: two mask files, or two folders matched by case name; or a folder of predictions and
            a dataset folder (see `match_dataset`), whose organs not contoured in a case are skipped.
        out: output folder (metrics.csv, summary.json, dice_boxplot.png, slices.csv, profiles/<case>.png).
        task: task name or file giving organ names, colours and surface Dice tolerances; or
        labels: JSON/YAML file of label id -> organ name. Neither: the dataset.json's labels when `ref`
            is a dataset that has them, else organs are `label_<value>`.
        tolerance_mm: surface Dice tolerance in mm, or organ name -> tolerance; None: each organ's
            `tolerance_mm` in the task file, else 2 mm (marked as the fallback in the summary).
        warn: receives one line per problem that does not stop the evaluation (missing partners).
        instances: folder of reference instance maps by case name, for a task with `instances`; None:
            those beside the reference labels (`medseg.evaluate.instance_cases`).

    Returns:
        The summary written to summary.json.
    """
    if task is not None and labels is not None:
        raise InputError("give organ names with --task or with --labels, not both")
    organs, from_task, colors, loaded = None, {}, {}, None
    if task is not None:
        loaded = load_task(task)
        organs, from_task = loaded.label_names, task_tolerances(loaded.labels)
        colors = {label.name: label.color for label in loaded.labels}
    elif labels is not None:
        organs = read_labels_file(labels)
    if instances is not None and (loaded is None or not loaded.instances):
        raise InputError("--instances needs --task naming a task with `instances` (the classes to score)")
    pairs, organs, not_contoured = _pairs(pred, ref, organs, warn)
    slice_rows: list[slices.SliceRow] = []
    flat: list[str] = []  # 2D images: no slice report

    def measure_slices(case, ref_map, pred_map, grid) -> None:
        if is_planar(grid.shape):
            flat.append(case)
        slice_rows.extend(slices.slice_rows(ref_map, pred_map, grid, organs, not_contoured.get(case, ()), case))

    given = tolerance_mm if tolerance_mm is not None else from_task
    rows = evaluate_pairs(pairs, organs, given, not_contoured, on_pair=measure_slices)
    pooled = {}
    if loaded is not None and loaded.instances:  # F1, PQ, AJI of the task's instance classes
        from medseg.evaluate.instance_cases import instance_rows

        found, pooled = instance_rows(pairs, loaded, None if instances is None else Path(instances), not_contoured, warn)
        rows += found
    names = dict.fromkeys(r["organ"] for r in rows if r["organ"] != CASE_ORGAN)
    summary = _write(rows, slice_rows, out, surface_tolerances(names, from_task, tolerance_mm), colors, flat,
                     len(flat) == len(pairs))[0]
    return _add_pooled(summary, pooled, out) if pooled else summary


def _add_pooled(summary: dict, pooled: dict[str, dict], out: str | Path) -> dict:
    """summary.json again with each instance class's pooled scores (all cases as one pool of objects, PQ's
    own convention) beside the per-case means."""
    import json

    from medseg.io import write_text

    for organ, scores in pooled.items():
        summary.setdefault(organ, {})["instances_pooled"] = scores
    write_text(json.dumps(summary, indent=2) + "\n", Path(out) / "summary.json")
    return summary


def _write(rows: list[Row], slice_rows: list[slices.SliceRow], out: str | Path, tolerances: dict[str, tuple[float, str]],
           colors: dict, flat: Sequence[str] = (), only_flat: bool = False) -> tuple[dict, list[Path]]:
    """The report files in `out`; returns the summary and the slice report's files (CSV, profile PNGs).

    `flat`: the 2D cases (no slice rows), named in the summary; `only_flat`: every case is 2D, so there is no
    slice report to write at all.
    """
    worst = slices.worst_slices(slice_rows)
    summary = write_report(rows, out, tolerances, worst, slices.skipped_note(flat, not only_flat) if flat else None)
    if only_flat:
        return summary, []
    return summary, [slices.write_slices_csv(slice_rows, out), *write_profiles(slice_rows, out, colors, worst)]


def report_case(ref: np.ndarray, pred: np.ndarray, grid: Grid, organs: dict[int, str], task: Task,
                out: str | Path, case: str) -> tuple[list[Row], dict, list[Path]]:
    """One case scored against its reference and reported into `out`, as `medseg predict --reference` does.

    Writes what `medseg evaluate` writes for one case (metrics.csv, summary.json, dice_boxplot.png,
    slices.csv, profiles/<case>.png; a 2D image has no slice report), with the task's surface Dice
    tolerances and colours.

    Returns:
        (metric rows, summary, [slices.csv, profile PNG], or [] for a 2D image).
    """
    from_task = task_tolerances(task.labels)
    rows = evaluate_case(ref, pred, grid.spacing, organs, from_task, case=case)
    slice_rows = slices.slice_rows(ref, pred, grid, organs, case=case)
    tolerances = surface_tolerances(organs.values(), from_task)
    flat = [case] if is_planar(grid.shape) else []
    summary, files = _write(rows, slice_rows, out, tolerances, {label.name: label.color for label in task.labels},
                            flat, bool(flat))
    return rows, summary, files
