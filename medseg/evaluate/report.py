"""Evaluation rows written as a report: metrics.csv (long form), summary.json, a Dice box plot, a table.

Rows are `{"case", "organ", "metric", "value"}` as `medseg.evaluate` makes them; keys of the summary
are organ names. Building the report as data first keeps every output format a plain function of it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medseg.config import CASE_ORGAN
from medseg.io import atomic_path, write_text

CSV_COLUMNS = ("case", "organ", "metric", "value")

Row = dict  # {"case": str, "organ": str, "metric": str, "value": float}


def _stats(values: list[float], n_empty: int) -> dict:
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    n = int(finite.size)
    return {
        "mean": float(finite.mean()) if n else None,
        "std": float(finite.std(ddof=1)) if n > 1 else None,
        "median": float(np.median(finite)) if n else None,
        "n": n,
        "n_empty": n_empty,
        "n_inf": int(sum(1 for v in values if math.isinf(v))),
    }


def summarize(rows: Sequence[Row]) -> dict[str, dict[str, dict]]:
    """Organ name -> metric -> {mean, std, median, n, n_empty, n_inf}.

    Mean, std (sample, ddof=1) and median are over finite values; `n` counts them. A (case, organ)
    with both masks empty (NaN Dice) is left out of every metric and counted in `n_empty`; `inf`
    distances are left out and counted in `n_inf`. Statistics of no value are null.
    """
    empty = {(r["case"], r["organ"]) for r in rows if r["metric"] == "dice" and math.isnan(r["value"])}
    values: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        values.setdefault(row["organ"], {}).setdefault(row["metric"], [])
        if (row["case"], row["organ"]) not in empty:
            values[row["organ"]][row["metric"]].append(float(row["value"]))
    n_empty = {organ: sum(1 for _, o in empty if o == organ) for organ in values}
    return {organ: {metric: _stats(v, n_empty[organ]) for metric, v in by_metric.items()}
            for organ, by_metric in values.items()}


def rows_to_csv(rows: Sequence[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([row["case"], row["organ"], row["metric"], repr(float(row["value"]))])
    return buffer.getvalue()


def write_dice_boxplot(rows: Sequence[Row], path: str | Path) -> Path | None:
    """Box plot of per-case Dice per organ (empty cases left out); None when there is no Dice."""
    organs: dict[str, list[float]] = {}
    for row in rows:
        if row["metric"] == "dice" and not math.isnan(row["value"]):
            organs.setdefault(row["organ"], []).append(row["value"])
    if not organs:
        return None
    from matplotlib.figure import Figure  # lazy: keeps `medseg --help` fast; Figure needs no pyplot state

    figure = Figure(figsize=(max(4.0, 1.1 * len(organs) + 1.5), 4.0), dpi=120)
    axes = figure.add_subplot()
    axes.boxplot(list(organs.values()), showmeans=True)
    axes.set_xticks(range(1, len(organs) + 1), list(organs), rotation=30, ha="right")
    axes.set_ylim(0, 1.02)
    axes.set_ylabel("Dice")
    axes.set_title(f"Dice per organ ({len({r['case'] for r in rows})} cases)")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return Path(path)


def add_details(summary: dict, tolerances: Mapping[str, tuple[float, str]] | None = None,
                worst: Mapping[str, Mapping] | None = None, notes: Mapping[str, object] | None = None) -> dict:
    """The summary with each organ's surface Dice tolerance and its source (under `surface_dice`:
    `tolerance_mm`, `tolerance_source`), its worst slices per case (`worst_slices`), and `notes` on the
    whole evaluation under CASE_ORGAN (e.g. `slices`: the cases without a slice report)."""
    if notes:
        summary.setdefault(CASE_ORGAN, {}).update(notes)
    for organ, (mm, source) in (tolerances or {}).items():
        if "surface_dice" in summary.get(organ, {}):
            summary[organ]["surface_dice"].update(tolerance_mm=mm, tolerance_source=source)
    for organ, cases in (worst or {}).items():
        if organ in summary:
            summary[organ]["worst_slices"] = dict(cases)
    return summary


def write_report(rows: Sequence[Row], out: str | Path, tolerances: Mapping[str, tuple[float, str]] | None = None,
                 worst: Mapping[str, Mapping] | None = None,
                 notes: Mapping[str, object] | None = None) -> dict[str, dict[str, dict]]:
    """Write metrics.csv (long form), summary.json and dice_boxplot.png into `out`; return the summary.

    `tolerances` (organ -> (mm, source), `cases.surface_tolerances`), `worst` (`slices.worst_slices`) and
    `notes` go into the summary as `add_details` puts them.
    """
    out = Path(out)
    summary = add_details(summarize(rows), tolerances, worst, notes)
    write_text(rows_to_csv(rows), out / "metrics.csv")
    write_text(json.dumps(summary, indent=2) + "\n", out / "summary.json")
    write_dice_boxplot(rows, out / "dice_boxplot.png")
    return summary


def _distance_units(summary: Mapping[str, Mapping[str, Mapping]], organs: Sequence[str]) -> dict[str, tuple]:
    """(factor, unit) of each distance column (HD95, ASSD, the surface Dice tolerance): mm, or µm where the
    column's largest finite value is under 0.1 mm (microscopy; `medseg.units`)."""
    from medseg.units import display_unit

    values = {"hd95_mm": [summary[o].get("hd95_mm", {}).get("mean") for o in organs],
              "assd_mm": [summary[o].get("assd_mm", {}).get("mean") for o in organs],
              "tolerance_mm": [summary[o].get("surface_dice", {}).get("tolerance_mm") for o in organs]}
    largest = {key: max((abs(v) for v in found if v is not None and math.isfinite(v)), default=0.0)
               for key, found in values.items()}
    return {key: display_unit(value, "mm") for key, value in largest.items()}


def format_table(summary: Mapping[str, Mapping[str, Mapping]]) -> str:
    """Plain-text table, organ x mean Dice / HD95 / ASSD / surface Dice (and its tolerance), for the terminal.

    Distances are shown in mm, or in µm where a column's largest is under 0.1 mm (microscopy: `medseg.units`).
    """
    columns = (("Dice", "dice", "{:.3f}"), ("HD95", "hd95_mm", "{:.2f}"), ("ASSD", "assd_mm", "{:.2f}"),
               ("SurfDice", "surface_dice", "{:.3f}"))
    organs = [o for o in summary if o != CASE_ORGAN]
    scale = _distance_units(summary, organs)  # metric -> (factor, unit); "tolerance_mm": the tolerance column's
    header = ["organ", *(f"{title} {scale[m][1]}" if m in scale else title for title, m, _ in columns),
              f"tol {scale['tolerance_mm'][1]}", "n", "empty", "inf"]
    fallback = False
    lines = []
    for organ in organs:
        cells = [organ]
        for _, metric, fmt in columns:
            mean = summary[organ].get(metric, {}).get("mean")
            cells.append("-" if mean is None else fmt.format(mean * scale.get(metric, (1.0,))[0]))
        surface = summary[organ].get("surface_dice", {})
        marked = surface.get("tolerance_source", "").startswith("fallback")
        fallback |= marked
        tolerance = surface.get("tolerance_mm")
        cells.append("-" if tolerance is None else f"{tolerance * scale['tolerance_mm'][0]:.2f}" + "*" * marked)
        dice = summary[organ].get("dice", {})
        cells += [str(dice.get("n", 0)), str(dice.get("n_empty", 0)),
                  str(max(summary[organ].get(m, {}).get("n_inf", 0) for m in ("hd95_mm", "assd_mm")))]
        lines.append(cells)
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header))]
    render = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                     for i, (c, w) in enumerate(zip(cells, widths)))
    text = [render(header), render(["-" * w for w in widths]), *map(render, lines)]
    if fallback:
        text.append("* surface Dice tolerance: the 2 mm fallback (no tolerance_mm for this organ in the task file)")
    accuracy = summary.get(CASE_ORGAN, {}).get("pixel_accuracy", {}).get("mean")
    if accuracy is not None:
        text.append(f"pixel accuracy {accuracy:.4f}, mean class accuracy "
                    f"{summary[CASE_ORGAN]['mean_pixel_accuracy']['mean']:.4f}")
    return "\n".join(text)
