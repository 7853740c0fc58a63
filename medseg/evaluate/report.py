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
                worst: Mapping[str, Mapping] | None = None) -> dict:
    """The summary with each organ's surface Dice tolerance and its source (under `surface_dice`:
    `tolerance_mm`, `tolerance_source`) and its worst slices per case (`worst_slices`)."""
    for organ, (mm, source) in (tolerances or {}).items():
        if "surface_dice" in summary.get(organ, {}):
            summary[organ]["surface_dice"].update(tolerance_mm=mm, tolerance_source=source)
    for organ, cases in (worst or {}).items():
        if organ in summary:
            summary[organ]["worst_slices"] = dict(cases)
    return summary


def write_report(rows: Sequence[Row], out: str | Path, tolerances: Mapping[str, tuple[float, str]] | None = None,
                 worst: Mapping[str, Mapping] | None = None) -> dict[str, dict[str, dict]]:
    """Write metrics.csv (long form), summary.json and dice_boxplot.png into `out`; return the summary.

    `tolerances` (organ -> (mm, source), `cases.surface_tolerances`) and `worst` (`slices.worst_slices`)
    go into the summary as `add_details` puts them.
    """
    out = Path(out)
    summary = add_details(summarize(rows), tolerances, worst)
    write_text(rows_to_csv(rows), out / "metrics.csv")
    write_text(json.dumps(summary, indent=2) + "\n", out / "summary.json")
    write_dice_boxplot(rows, out / "dice_boxplot.png")
    return summary


def format_table(summary: Mapping[str, Mapping[str, Mapping]]) -> str:
    """Plain-text table, organ x mean Dice / HD95 / ASSD / surface Dice (and its tolerance), for the terminal."""
    columns = (("Dice", "dice", "{:.3f}"), ("HD95 mm", "hd95_mm", "{:.2f}"), ("ASSD mm", "assd_mm", "{:.2f}"),
               ("SurfDice", "surface_dice", "{:.3f}"))
    organs = [o for o in summary if o != CASE_ORGAN]
    header = ["organ", *(c[0] for c in columns), "tol mm", "n", "empty", "inf"]
    fallback = False
    lines = []
    for organ in organs:
        cells = [organ]
        for _, metric, fmt in columns:
            mean = summary[organ].get(metric, {}).get("mean")
            cells.append("-" if mean is None else fmt.format(mean))
        surface = summary[organ].get("surface_dice", {})
        marked = surface.get("tolerance_source", "").startswith("fallback")
        fallback |= marked
        cells.append("-" if "tolerance_mm" not in surface else f"{surface['tolerance_mm']:.2f}" + "*" * marked)
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
