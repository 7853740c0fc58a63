"""Slice-wise reports: Dice and areas of each organ on every axial slice, and the worst slices named.

A volume's Dice hides where a contour goes wrong: a prostate can score 0.85 and still be missing
from its apex slices. `slice_rows` measures each organ slice by slice, built like the volume metrics:
confusion counts per slice first (`slice_counts`, vectorised with numpy), then
`medseg.evaluate.metrics.dice` on them.

- Axial means across the patient's head-foot axis whatever the file's voxel order: the slices are
  taken along the voxel axis running closest to world z (`medseg.geometry.axis_order`), so an
  LPS, RAS or PLI file of the same scan gives the same rows.
- `k` is the slice's index along that axis in the file (0-based; ITK-SNAP counts from 1), `z_mm`
  the world z of the slice's centre (LPS and RAS agree on z: superior is positive). Rows run from
  inferior to superior.
- An organ gets a row for every slice from the first to the last one holding it in either mask; an
  organ absent from both masks, or not contoured in the case, gets none.
- Dice of a slice is NaN when neither mask holds the organ there (a gap inside its extent), 0 when
  exactly one does: the conventions of the volume metrics.

`worst_slices` names, per case and organ, the `WORST_COUNT` slices with the lowest Dice (ties: the
larger disagreeing area first) and every slice where only one mask holds the organ.

A 2D image (one slice, `medseg.planar`) gets no rows: its one "slice" is the whole image, whose Dice and
area the volume metrics already give, and a profile of one point shows nothing. `medseg evaluate` then
writes no slices.csv or profile plots when every case is 2D, and says so in summary.json (`skipped_note`).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from medseg.evaluate import metrics
from medseg.geometry import axis_order, organ_boxes
from medseg.io import Grid, write_text
from medseg.planar import is_planar

SLICES_CSV = "slices.csv"
COLUMNS = ("case", "organ", "k", "z_mm", "ref_area_mm2", "pred_area_mm2", "dice")
WORST_COUNT = 3  # lowest-Dice slices named per case and organ
PLANAR_REASON = "2D images (one slice each): no slices along a head-foot axis, so no slices.csv rows or profile plots"

SliceRow = dict  # {"case": str, "organ": str, "k": int, "z_mm": float, "ref_area_mm2", "pred_area_mm2", "dice"}


def head_foot_axis(direction: Sequence[float]) -> int:
    """The voxel axis running closest to the patient's head-foot (world z) axis."""
    return axis_order(direction)[2]


def slice_z(grid: Grid, axis: int) -> np.ndarray:
    """World z in mm (superior positive) of the centre of every slice along voxel `axis`, shape (N,)."""
    index = np.tile((np.asarray(grid.shape, dtype=float) - 1) / 2, (grid.shape[axis], 1))
    index[:, axis] = np.arange(grid.shape[axis])
    return index @ grid.affine[2, :3] + grid.affine[2, 3]


def slice_counts(ref_mask: np.ndarray, pred_mask: np.ndarray, axis: int) -> tuple[np.ndarray, ...]:
    """Per-slice confusion counts (tp, fp, fn) of two binary masks along `axis`, each shape (N,)."""
    ref_mask, pred_mask = np.asarray(ref_mask, dtype=bool), np.asarray(pred_mask, dtype=bool)
    others = tuple(a for a in range(ref_mask.ndim) if a != axis)
    tp = np.count_nonzero(ref_mask & pred_mask, axis=others)
    return tp, np.count_nonzero(pred_mask, axis=others) - tp, np.count_nonzero(ref_mask, axis=others) - tp


def slice_rows(ref: np.ndarray, pred: np.ndarray, grid: Grid, organs: Mapping[int, str] | None,
               not_contoured: Iterable[str] = (), case: str = "case") -> list[SliceRow]:
    """Dice and areas of every organ on every axial slice it occupies, as rows (`COLUMNS`).

    Args:
        ref: reference label map (X, Y, Z), integer values (0 background).
        pred: predicted label map on the same grid.
        grid: the maps' grid: spacing for the areas, direction for the head-foot axis, origin for z.
        organs: label value -> organ name; None names the values present `label_<value>`.
        not_contoured: organs not contoured in this reference: no rows.
        case: the case name written in every row.

    Returns:
        Rows in label order, each organ's from inferior to superior; none for a 2D image (one slice).
    """
    ref, pred = np.asarray(ref), np.asarray(pred)
    if ref.shape != pred.shape or ref.shape != tuple(grid.shape):
        raise ValueError(f"reference {ref.shape}, prediction {pred.shape} and grid {tuple(grid.shape)} must "
                         "have one shape")
    if is_planar(grid.shape):
        return []
    axis = head_foot_axis(grid.direction)
    pixel_mm2 = float(np.prod([s for a, s in enumerate(grid.spacing) if a != axis]))
    z = slice_z(grid, axis)
    present = organ_boxes(ref, pred)
    names = {v: f"label_{v}" for v in sorted(present)} if organs is None else dict(sorted(organs.items()))
    skip = set(not_contoured)
    rows: list[SliceRow] = []
    for value, organ in names.items():
        if organ in skip or value not in present:
            continue
        box = present[value]
        tp, fp, fn = slice_counts(ref[box] == value, pred[box] == value, axis)
        ks = np.arange(box[axis].start, box[axis].stop)
        for i in np.argsort(z[ks], kind="stable"):
            rows.append({"case": case, "organ": organ, "k": int(ks[i]), "z_mm": float(z[ks[i]]),
                         "ref_area_mm2": float(tp[i] + fn[i]) * pixel_mm2,
                         "pred_area_mm2": float(tp[i] + fp[i]) * pixel_mm2,
                         "dice": metrics.dice(int(tp[i]), int(fp[i]), int(fn[i]))})
    return rows


def skipped_note(cases: Sequence[str], written: bool) -> dict:
    """For summary.json (under "all"): the cases without a slice report, why, and whether slices.csv and the
    profiles were written at all (for the other cases of a mixed evaluation)."""
    return {"slices": {"skipped_cases": list(cases), "reason": PLANAR_REASON, "slice_report_written": written}}


def rows_to_csv(rows: Sequence[SliceRow]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([row["case"], row["organ"], row["k"],
                         *(repr(round(float(row[c]), 6)) for c in COLUMNS[3:])])
    return buffer.getvalue()


def _badness(row: SliceRow) -> tuple[float, float, float]:
    """Sort key, worst first: lowest Dice, then the larger area where the masks disagree."""
    area = row["ref_area_mm2"] + row["pred_area_mm2"]
    return row["dice"], -area * (1.0 - row["dice"]), row["z_mm"]


def _entry(row: SliceRow) -> dict:
    return {"k": row["k"], "z_mm": round(row["z_mm"], 2), "dice": round(row["dice"], 4),
            "ref_area_mm2": round(row["ref_area_mm2"], 1), "pred_area_mm2": round(row["pred_area_mm2"], 1)}


def worst_slices(rows: Sequence[SliceRow], count: int = WORST_COUNT) -> dict[str, dict[str, dict]]:
    """Organ -> case -> the slices to look at first.

    Each case holds `lowest_dice` (the `count` slices with the lowest Dice among those where either
    mask holds the organ, worst first, with k, z_mm, dice and both areas), `ref_only_z_mm` (slices the
    prediction misses entirely) and `pred_only_z_mm` (slices where only the prediction has the organ).
    """
    groups: dict[str, dict[str, list[SliceRow]]] = {}
    for row in rows:
        groups.setdefault(row["organ"], {}).setdefault(row["case"], []).append(row)
    out: dict[str, dict[str, dict]] = {}
    for organ, cases in groups.items():
        for case, found in cases.items():
            scored = sorted((r for r in found if not math.isnan(r["dice"])), key=_badness)
            out.setdefault(organ, {})[case] = {
                "lowest_dice": [_entry(r) for r in scored[:count]],
                "ref_only_z_mm": [round(r["z_mm"], 2) for r in found if r["pred_area_mm2"] == 0 < r["ref_area_mm2"]],
                "pred_only_z_mm": [round(r["z_mm"], 2) for r in found if r["ref_area_mm2"] == 0 < r["pred_area_mm2"]],
            }
    return out


def format_worst(worst: Mapping[str, Mapping[str, Mapping]], count: int = WORST_COUNT) -> str:
    """A few lines for the terminal: per organ, the worst slices over all cases and the one-mask slices."""
    lines = []
    for organ, cases in worst.items():
        entries = sorted(((case, e) for case, found in cases.items() for e in found["lowest_dice"] if e["dice"] < 1),
                         key=lambda item: _badness(item[1]))
        shown = " | ".join(f"{case} z {e['z_mm']:.1f} Dice {e['dice']:.2f} ({e['ref_area_mm2']:.0f}/"
                           f"{e['pred_area_mm2']:.0f})" for case, e in entries[:count])
        ref_only = sum(len(found["ref_only_z_mm"]) for found in cases.values())
        pred_only = sum(len(found["pred_only_z_mm"]) for found in cases.values())
        lines.append(f"  {organ}: {shown or 'every slice Dice 1'}; one mask only: {ref_only} ref, {pred_only} pred")
    if not lines:
        return ""
    head = (f"worst slices (z mm, Dice, ref/pred area mm2; every case in summary.json, every slice in {SLICES_CSV}; "
            "one mask only: slices where only the reference or the prediction has the organ):")
    return "\n".join([head, *lines])


def write_slices_csv(rows: Sequence[SliceRow], out: str | Path) -> Path:
    return write_text(rows_to_csv(rows), Path(out) / SLICES_CSV)
