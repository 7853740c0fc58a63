"""The review page's trust parts: every QA flag worst first above the cases, a flags column, and the
switch that shows the uncertainty pictures in place of the thumbnails.

The flags come from `medseg.infer.qa` (each case row's `flags`: organ, check, reason, severity); the
uncertainty pictures (`<case>_uncertainty.png`) from `medseg.review.heatmap`. `medseg.review.page`
builds the page and calls these for its pieces.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from medseg.errors import InputError

UNCERTAINTY_VIEW = "uncertainty"  # `<case>_uncertainty.png` among a row's overlays


def check_flags(case: Mapping) -> None:
    """A row's `flags` must be a list of {organ, check, reason, severity} mappings."""
    flags = case.get("flags") or []
    keys = {"organ", "check", "reason", "severity"}
    if not isinstance(flags, list) or not all(isinstance(f, Mapping) and keys <= set(f) for f in flags):
        raise InputError(f"review case '{case['case']}': 'flags' must be a list of {{organ, check, reason, severity}}, "
                         f"got {flags!r}")


def case_severity(case: Mapping) -> float:
    """How much a case's flags weigh together (their summed severities): the worst case first."""
    return float(sum(flag["severity"] for flag in case.get("flags") or []))


def anchor(name: str) -> str:
    """The id of a case's row, for links from the flags list."""
    return "case-" + re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def flags_section(rows: Sequence[Mapping]) -> str:
    """A table of every flag of every case, worst first, each linking to its case's row ('' without flags)."""
    esc = html.escape
    flags = sorted(((flag, row["case"]) for row in rows for flag in row.get("flags") or []),
                   key=lambda item: (-item[0]["severity"], item[1], item[0]["organ"]))
    if not flags:
        return ""
    lines = "\n".join(
        f'<tr class="flag" data-flag-case="{esc(case)}"><td><a href="#{esc(anchor(case))}">{esc(case)}</a></td>'
        f'<td>{esc(flag["organ"])}</td><td>{esc(flag["check"])}</td><td>{esc(flag["reason"])}</td></tr>'
        for flag, case in flags)
    cases = len({case for _, case in flags})
    return (f'<h2>QA flags: {len(flags)} in {cases} case{"s" if cases != 1 else ""}, worst first</h2>\n'
            f'<table id="flags"><thead><tr><th>Case</th><th>Organ</th><th>Check</th><th>Reason</th></tr></thead>'
            f"<tbody>\n{lines}\n</tbody></table>\n")


def flags_cell(case: Mapping) -> str:
    """The flags column of a case's row: organ and check of each flag; sorted by their summed severity."""
    esc = html.escape
    flags = case.get("flags") or []
    text = "".join(f'<div title="{esc(f["reason"])}">{esc(f["organ"])}: {esc(f["check"])}</div>' for f in flags)
    return f'<td class="flags" data-value="{case_severity(case)!r}">{text}</td>'


def uncertainty_image(name: str, href: str | None) -> str:
    """The uncertainty picture, hidden until the page's switch is on ('' without one)."""
    if href is None:
        return ""
    esc = html.escape
    return f'<img class="uncertainty" src="{esc(href)}" alt="uncertainty of {esc(name)}" loading="lazy">'


def uncertainty_of(overlays: Sequence[str | Path]) -> str | Path | None:
    """The row's uncertainty picture among its overlay files, if any."""
    return next((p for p in overlays if Path(p).stem.endswith("_" + UNCERTAINTY_VIEW)), None)


def uncertainty_switch(rows: Sequence[Mapping]) -> str:
    """The checkbox that swaps thumbnails for uncertainty pictures ('' when no case has one)."""
    if not any(uncertainty_of(row.get("overlays") or []) for row in rows):
        return ""
    return ('<p><label><input type="checkbox" id="show-uncertainty"> show uncertainty (normalised entropy of the '
            'averaged probabilities: yellow to red where the model is unsure) in place of the thumbnails</label></p>\n')


STYLE = """
  #cases.uncertainty img.thumb, img.uncertainty { display: none; }
  #cases.uncertainty img.uncertainty { display: block; max-height: 200px; max-width: 360px; }
  td.flags { font-size: 12px; color: #a00; white-space: nowrap; }
  #flags { margin-bottom: 1.5em; } #flags td { font-size: 13px; }
"""
