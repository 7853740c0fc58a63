"""Profile plots: each organ's slice Dice and areas along the head-foot axis, one PNG per case.

Drawn from the rows of `medseg.evaluate.slices` (data first, then the picture), with matplotlib's
`Figure` imported lazily, as for the Dice box plot: no pyplot state, `medseg --help` stays fast.
The x axis is world z (inferior on the left), so two cases, or one case in two voxel orders, line up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medseg.evaluate.slices import SliceRow
from medseg.io import atomic_path

PROFILES = "profiles"  # folder of the per-case PNGs, inside the report folder


def profile_path(out: str | Path, case: str) -> Path:
    """Where the profile plot of `case` goes in the report folder `out`."""
    return Path(out) / PROFILES / f"{case}.png"


def _by_organ(rows: Sequence[SliceRow]) -> dict[str, dict[str, np.ndarray]]:
    organs: dict[str, list[SliceRow]] = {}
    for row in rows:
        organs.setdefault(row["organ"], []).append(row)
    return {organ: {key: np.asarray([r[key] for r in found], dtype=float)
                    for key in ("z_mm", "dice", "ref_area_mm2", "pred_area_mm2")}
            for organ, found in organs.items()}


def draw_profile(rows: Sequence[SliceRow], title: str, colors: Mapping[str, Sequence[int]] | None = None,
                 worst: Mapping[str, Mapping] | None = None):
    """A matplotlib Figure: slice Dice (top) and reference/prediction areas (bottom) against z, one colour
    per organ; the worst slices (organ -> `worst_slices` entry of this case) are circled."""
    from matplotlib.figure import Figure  # lazy: keeps `medseg --help` fast; Figure needs no pyplot state

    figure = Figure(figsize=(9.0, 5.5), dpi=100)
    # a fixed layout, legends right of the axes: constrained/tight layout would double the drawing time
    dice_axes, area_axes = figure.subplots(2, 1, sharex=True, gridspec_kw={
        "height_ratios": (1, 1.2), "left": 0.08, "right": 0.79, "top": 0.94, "bottom": 0.09, "hspace": 0.08})
    cycle = [f"C{i}" for i in range(10)]
    for i, (organ, series) in enumerate(_by_organ(rows).items()):
        rgb = (colors or {}).get(organ)
        color = tuple(c / 255 for c in rgb) if rgb is not None else cycle[i % len(cycle)]
        dice_axes.plot(series["z_mm"], series["dice"], ".-", color=color, label=organ, lw=1.2, ms=3)
        area_axes.plot(series["z_mm"], series["ref_area_mm2"], "-", color=color, lw=1.2)
        area_axes.plot(series["z_mm"], series["pred_area_mm2"], "--", color=color, lw=1.2)
        marked = (worst or {}).get(organ, {}).get("lowest_dice", [])
        if marked:
            dice_axes.plot([e["z_mm"] for e in marked], [e["dice"] for e in marked], "o", mfc="none", mec=color,
                           ms=8)
    dice_axes.set_ylim(-0.03, 1.03)
    dice_axes.set_ylabel("slice Dice")
    dice_axes.set_title(f"{title}: per-slice Dice and areas (circled: worst slices)")
    dice_axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    area_axes.plot([], [], "-", color="0.3", label="reference")
    area_axes.plot([], [], "--", color="0.3", label="prediction")
    area_axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    area_axes.set_ylabel("area (mm²)")
    area_axes.set_xlabel("z (mm, world): inferior ← → superior")
    for axes in (dice_axes, area_axes):
        axes.grid(alpha=0.3)
    return figure


def write_profiles(rows: Sequence[SliceRow], out: str | Path, colors: Mapping[str, Sequence[int]] | None = None,
                   worst: Mapping[str, Mapping[str, Mapping]] | None = None) -> list[Path]:
    """One profile PNG per case under `out/profiles/`; returns their paths, in case order.

    Args:
        rows: slice rows of any number of cases (`medseg.evaluate.slices.slice_rows`).
        out: the report folder.
        colors: organ -> RGB 0..255 (the task's colours); others take matplotlib's cycle.
        worst: `worst_slices(rows)`, organ -> case -> entry: those slices are circled.
    """
    cases: dict[str, list[SliceRow]] = {}
    for row in rows:
        cases.setdefault(row["case"], []).append(row)
    paths = []
    for case, found in cases.items():
        marked = {organ: by_case[case] for organ, by_case in (worst or {}).items() if case in by_case}
        figure = draw_profile(found, case, colors, marked)
        path = profile_path(out, case)
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png")
        paths.append(path)
    return paths
