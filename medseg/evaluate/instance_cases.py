"""Instance metrics in `medseg evaluate`: find each case's instance maps, score the task's instance classes.

For a task with `instances: [nucleus]`, each case is scored where a reference instance map exists:
- the reference: a file of the case's name in `--instances FOLDER`, else beside the reference labels in a
  folder named like theirs with `instances` for `labels` (`labelsTs/x.nii.gz` -> `instancesTs/x.nii.gz`,
  the layout `medseg sample-data --task cells` writes; `labels/` -> `instances/`);
- the prediction: `<case>_instances.nii.gz` beside `<case>_seg.nii.gz`, as `medseg predict` writes it,
  else the predicted mask split here the same way (`medseg.infer.instances`).
An instance class is scored on the voxels both maps give that class, so one instance map may hold
several classes. Rows go into metrics.csv like the other metrics (`INSTANCE_METRICS`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from medseg.config import Task
from medseg.errors import InputError
from medseg.evaluate.instances import instance_scores, pooled_scores
from medseg.evaluate.matching import PRED_SUFFIX, Pair
from medseg.evaluate.report import Row
from medseg.io import Grid, case_name, read_label, read_sitk, to_array

# metric name in the report -> key of `instance_scores`; counts come along to read the scores by
INSTANCE_METRICS = {"instance_f1": "f1", "instance_precision": "precision", "instance_recall": "recall",
                    "pq": "pq", "sq": "sq", "aji": "aji", "instances_ref": "n_reference",
                    "instances_pred": "n_predicted"}
INSTANCES_SUFFIX = "_instances"  # `medseg predict` writes <case>_instances.nii.gz beside <case>_seg.nii.gz


def read_instances(path: Path) -> tuple[np.ndarray, Grid]:
    """An instance map (any integer ids >= 0; 2D held as (X, Y, 1)) and its grid."""
    image = read_sitk(path, dimensions=None)
    array = to_array(image)
    if array.dtype.kind == "f" and not (np.isfinite(array).all() and np.array_equal(array, np.round(array))):
        raise InputError(f"{path}: an instance map needs whole-number ids")
    if array.size and array.min() < 0:
        raise InputError(f"{path}: instance ids must be 0 (background) or positive, got {array.min()}")
    return array.astype(np.uint32), Grid.of(image)


def reference_instances(ref: Path, folder: Path | None) -> Path | None:
    """The reference instance map of reference labels `ref`: in `folder` by case name, else beside."""
    name = case_name(ref)
    if folder is not None:
        found = [p for p in sorted(Path(folder).glob(f"{name}.*")) if case_name(p) == name]
        return found[0] if found else None
    parent = ref.parent.name
    if "labels" not in parent:
        return None
    beside = ref.parent.parent / parent.replace("labels", "instances", 1) / ref.name
    return beside if beside.is_file() else None


def predicted_instances(pred: Path) -> Path | None:
    """`<case>_instances.<suffix>` beside a `medseg predict` mask `<case>_seg.<suffix>`."""
    name = case_name(pred)
    stem = name.removesuffix(PRED_SUFFIX)
    beside = pred.parent / (stem + INSTANCES_SUFFIX + pred.name[len(name):])
    return beside if beside.is_file() else None


def _read_pair(ref_file: Path, pred_file: Path, ref_instances: Path, task: Task):
    """Reference and predicted label and instance maps of one case, all on one grid."""
    from medseg.infer.instances import split_classes

    ref_labels, grid = read_label(ref_file, dimensions=None)
    pred_labels, pred_grid = read_label(pred_file, dimensions=None)
    ref_ids, ref_ids_grid = read_instances(ref_instances)
    for path, other in ((pred_file, pred_grid), (ref_instances, ref_ids_grid)):
        if not other.matches(grid):
            raise InputError(f"{path}: not on the grid of {ref_file} ({other.difference(grid)})")
    found = predicted_instances(pred_file)
    if found is not None:
        pred_ids, ids_grid = read_instances(found)
        if not ids_grid.matches(grid):
            raise InputError(f"{found}: not on the grid of {ref_file} ({ids_grid.difference(grid)})")
    else:
        pred_ids = split_classes(pred_labels, [task.label_id(n) for n in task.instances], grid.spacing)
    return ref_labels, pred_labels, ref_ids, pred_ids


def instance_rows(pairs: Sequence[Pair], task: Task, folder: Path | None = None,
                  not_contoured: Mapping[str, set[str]] | None = None,
                  warn: Callable[[str], None] = print) -> tuple[list[Row], dict[str, dict]]:
    """Rows (case, class, metric, value) of every case with a reference instance map, and per class the
    scores of all those cases pooled (`medseg.evaluate.instances.pooled_scores`)."""
    if not task.instances:
        return [], {}
    rows: list[Row] = []
    scored: dict[str, list[dict]] = {name: [] for name in task.instances}
    missing = []
    for case, pred_file, ref_file in pairs:
        ref_instances = reference_instances(Path(ref_file), folder)
        if ref_instances is None:
            missing.append(case)
            continue
        ref_labels, pred_labels, ref_ids, pred_ids = _read_pair(Path(ref_file), Path(pred_file), ref_instances, task)
        for name in task.instances:
            if name in (not_contoured or {}).get(case, ()):
                continue
            value = task.label_id(name)
            scores = instance_scores(np.where(ref_labels == value, ref_ids, 0), np.where(pred_labels == value, pred_ids, 0))
            scored[name].append(scores)
            rows += [{"case": case, "organ": name, "metric": metric, "value": float(scores[key])}
                     for metric, key in INSTANCE_METRICS.items()]
    if missing:
        where = f"in {folder}" if folder is not None else "beside the reference labels (instancesTs/ for labelsTs/)"
        warn(f"warning: no reference instance map {where} for {len(missing)} case(s): {', '.join(missing[:5])}"
             + (" ..." if len(missing) > 5 else "") + " (no instance metrics there)")
    return rows, {name: pooled_scores(cases) for name, cases in scored.items() if cases}


def format_instances(summary: Mapping[str, Mapping]) -> str:
    """One line per instance class: mean F1, PQ and AJI over the cases, and F1 and PQ of the pooled cases."""
    lines = []
    for organ, metrics in summary.items():
        if "instance_f1" not in metrics:
            continue
        means = [(label, metrics.get(m, {}).get("mean")) for label, m in
                 (("F1@0.5", "instance_f1"), ("PQ", "pq"), ("AJI", "aji"))]
        text = ", ".join(f"{label} {'-' if mean is None else f'{mean:.3f}'}" for label, mean in means)
        pooled = metrics.get("instances_pooled", {})
        if pooled.get("f1") is not None and not np.isnan(pooled["f1"]):
            text += f"; pooled F1 {pooled['f1']:.3f}, PQ {pooled['pq']:.3f} ({pooled['tp']} matched, " \
                    f"{pooled['fn']} missed, {pooled['fp']} spurious)"
        lines.append(f"{organ} instances, mean of {metrics['instance_f1']['n']} case(s): {text}")
    return "\n".join(lines)
