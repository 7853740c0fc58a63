"""A static review page: every case with its overlay thumbnail, organ volumes and Dice, worst first.

`review.html` is one self-contained file (inline CSS and JS, no CDN, no server): it opens from
`file://`, and a Content-Security-Policy forbids any network access. Overlay PNGs are referenced
relative to the page, so the output folder can be moved or zipped as a whole. The table is built as
data first (`review_rows`), then written (`render_page`). The inline script sorts the rows when a
column header is clicked (or the URL ends in `#sort=KEY` / `#sort=-KEY`), replaces a thumbnail whose
PNG is missing by a note (and reports it on the console), and marks the table `data-ready`.

With references, a "Worst slices" column links each case's slice report (profile plot, slices.csv from
`medseg.evaluate.slices`) and names each organ's lowest-Dice slice.

Worst first means: with references, the lowest mean Dice first; without, the cases with the most
empty organs (0 mL: the model found nothing there) first; then by name.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

from medseg.errors import InputError
from medseg.io import write_text
from medseg.review import flags as trust

POOR, FAIR = 0.70, 0.85  # Dice shading: red below POOR, amber below FAIR, green from FAIR


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _check(case: Mapping, position: int) -> None:
    if not isinstance(case, Mapping) or not isinstance(case.get("case"), str) or not case["case"]:
        raise InputError(f"review case #{position} must be a mapping with a non-empty 'case' name, got {case!r}")
    for key in ("volumes_ml", "dice"):
        if case.get(key) is not None and not isinstance(case[key], Mapping):
            raise InputError(f"review case '{case['case']}': '{key}' must map organ names to numbers, got {case[key]!r}")
    for key, what in (("overlays", "PNG paths"), ("slice_files", "file paths")):
        paths = case.get(key) or []
        if isinstance(paths, (str, Path)) or not all(isinstance(p, (str, Path)) for p in paths):
            raise InputError(f"review case '{case['case']}': '{key}' must be a list of {what}, got {paths!r}")
    trust.check_flags(case)
    worst = case.get("worst_slices") or {}
    if not isinstance(worst, Mapping) or not all(isinstance(w, Mapping) and "z_mm" in w for w in worst.values()):
        raise InputError(f"review case '{case['case']}': 'worst_slices' must map organ names to "
                         f"{{z_mm, dice}}, got {worst!r}")


def mean_dice(case: Mapping) -> float:
    """Mean Dice over the organs with a defined value (NaN for organs absent from both masks)."""
    values = [v for v in map(_number, (case.get("dice") or {}).values()) if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def empty_organs(case: Mapping) -> list[str]:
    """Organs of a case with no voxel in the mask (volume 0 mL)."""
    return [organ for organ, ml in (case.get("volumes_ml") or {}).items() if _number(ml) == 0]


def review_rows(cases: Sequence[Mapping]) -> list[Mapping]:
    """Cases worst first: lowest mean Dice first, then cases without Dice; then the heaviest QA flags, then the
    most empty organs; ties by name."""
    for position, case in enumerate(cases):
        _check(case, position)

    def worst_first(case: Mapping) -> tuple:
        score = mean_dice(case)
        return (math.isnan(score), 0.0 if math.isnan(score) else score, -trust.case_severity(case),
                -len(empty_organs(case)), case["case"])

    return sorted(cases, key=worst_first)


def _href(path: str | Path, out: Path) -> str:
    """URL of an overlay relative to the page, whatever form the path was given in."""
    path = Path(path)
    if path.is_absolute():
        path = Path(os.path.relpath(path, out.resolve()))
    return quote(path.as_posix(), safe="/")


def _view_name(path: str | Path) -> str:
    stem = Path(path).stem
    return stem.rsplit("_", 1)[-1] if "_" in stem else stem


def _cell(value: float, digits: int, shade: bool = False) -> str:
    if math.isnan(value):
        return '<td class="num" data-value="">&ndash;</td>'
    grade = "" if not shade else (" poor" if value < POOR else " fair" if value < FAIR else " good")
    return f'<td class="num{grade}" data-value="{value!r}">{value:.{digits}f}</td>'


def _size_cell(value: float, factor: float) -> str:
    """An organ's size in its column's unit (`medseg.units`): about three significant digits."""
    from medseg.units import number

    if math.isnan(value):
        return _cell(value, 0)
    return f'<td class="num" data-value="{value * factor!r}">{number(value * factor)}</td>'


def _size_units(rows: Sequence[Mapping], sizes: str, unit: str, organs: Sequence[str]) -> dict[str, tuple[float, str]]:
    """Organ -> (factor, unit) of its size column: the unit that reads for the organ's largest size."""
    from medseg.units import display_unit

    units = {}
    for organ in organs:
        values = [abs(_number((row.get(sizes) or {}).get(organ))) for row in rows]
        units[organ] = display_unit(max((v for v in values if not math.isnan(v)), default=0.0), unit)
    return units


def _header(title: str) -> str:
    """A column title that wraps: organ name above its unit, long names broken after underscores."""
    words = [html.escape(w).replace("_", "_<wbr>") for w in title.split(" ")]
    return " ".join(words[:-1]) + "<br>" + words[-1] if len(words) > 1 else words[0]


def _overlay_cell(name: str, overlays: Sequence[str | Path], out: Path) -> str:
    """The thumbnail (`*_thumb.png`, else the axial montage) linking to the axial montage, and a link per montage."""
    esc = html.escape
    montages = [p for p in overlays if _view_name(p) != "thumb"]
    thumb = next((p for p in overlays if _view_name(p) == "thumb"),
                 next((p for p in montages if _view_name(p) == "axial"), montages[0] if montages else None))
    if thumb is None:
        return "<td>no overlay</td>"
    target = next((p for p in montages if _view_name(p) == "axial"), thumb)
    links = " ".join(f'<a href="{esc(_href(p, out))}">{esc(_view_name(p))}</a>' for p in montages)
    uncertainty = trust.uncertainty_of(overlays)  # shown instead of the thumbnail by the page's switch
    layer = trust.uncertainty_image(name, None if uncertainty is None else _href(uncertainty, out))
    return (f'<td><a href="{esc(_href(target, out))}"><img class="thumb" src="{esc(_href(thumb, out))}" '
            f'alt="overlay of {esc(name)}" loading="lazy">{layer}</a><div class="links">{links}</div></td>')


def _slices_cell(row: Mapping, out: Path) -> str:
    """Links to the case's slice report (profile plot, slices.csv) and the worst slice of each organ that has
    one below FAIR, worst first; sorted by the lowest slice Dice."""
    esc = html.escape
    links = " ".join(f'<a href="{esc(_href(p, out))}">{"profile" if str(p).endswith(".png") else esc(Path(p).name)}</a>'
                     for p in row.get("slice_files") or [])
    worst = sorted((row.get("worst_slices") or {}).items(), key=lambda item: _number(item[1].get("dice")))
    lines = "".join(f'<div>{esc(organ)} z {_number(w["z_mm"]):.1f} mm: Dice {_number(w.get("dice")):.2f}</div>'
                    for organ, w in worst if _number(w.get("dice")) < FAIR)
    lowest = _number(worst[0][1].get("dice")) if worst else math.nan
    lines = lines or ("" if math.isnan(lowest) else f"<div>every slice Dice &ge; {FAIR:.2f}</div>")
    return (f'<td class="slices" data-value="{"" if math.isnan(lowest) else repr(lowest)}">'
            f'<div class="links">{links}</div>{lines}</td>')


def render_page(rows: Sequence[Mapping], out: Path) -> str:
    """The HTML text of the review page for cases already in display order."""
    esc = html.escape
    organs: list[str] = []
    for row in rows:
        for name in list(row.get("volumes_ml") or {}) + list(row.get("dice") or {}):
            if name not in organs:
                organs.append(name)
    with_dice = any(row.get("dice") for row in rows)
    columns = [("rank", "#", "number"), ("case", "Case", "text"), ("overlay", "Overlay", "")]
    if with_dice:
        columns.append(("mean_dice", "Mean Dice", "number"))
    with_slices = any(row.get("slice_files") or row.get("worst_slices") for row in rows)
    if with_slices:
        columns.append(("worst_slice", "Worst slices", "number"))
    with_flags = any(row.get("flags") for row in rows)
    if with_flags:
        columns.append(("flags", "QA flags", "number"))
    columns.append(("empty", "Empty organs", "number"))
    sizes, unit = ("areas_mm2", "mm²") if any(row.get("areas_mm2") for row in rows) else ("volumes_ml", "mL")  # 2D: areas
    shown = _size_units(rows, sizes, unit, organs)
    for organ in organs:
        columns.append((f"ml:{organ}", f"{organ} {shown[organ][1]}", "number"))
        if with_dice:
            columns.append((f"dice:{organ}", f"{organ} Dice", "number"))
    initial = "mean_dice" if with_dice else "rank"  # the column whose order the rows are in
    head = "".join(
        f'<th data-key="{esc(key)}" data-type="{kind}"{" tabindex=0" if kind else ""}'
        f'{" aria-sort=ascending" if key == initial else ""}>{_header(title)}</th>'
        for key, title, kind in columns)
    body = []
    for rank, row in enumerate(rows, start=1):
        name = row["case"]
        empty = empty_organs(row)
        cells = [f'<td class="num" data-value="{rank}">{rank}</td>', f'<td class="name">{esc(name)}</td>',
                 _overlay_cell(name, row.get("overlays") or [], out)]
        if with_dice:
            cells.append(_cell(mean_dice(row), 3, shade=True))
        if with_slices:
            cells.append(_slices_cell(row, out))
        if with_flags:
            cells.append(trust.flags_cell(row))
        cells.append(f'<td data-value="{len(empty)}"{" class=empty" if empty else ""}>{esc(", ".join(empty))}</td>')
        for organ in organs:
            cells.append(_size_cell(_number((row.get(sizes) or {}).get(organ)), shown[organ][0]))
            if with_dice:
                cells.append(_cell(_number((row.get("dice") or {}).get(organ)), 3, shade=True))
        body.append(f'<tr data-case="{esc(name)}" id="{trust.anchor(name)}">{"".join(cells)}</tr>')
    order = "lowest mean Dice first" if with_dice else "most empty organs first, then by name"
    if with_flags and not with_dice:
        order = "heaviest QA flags first, then most empty organs, then by name"
    return _PAGE.format(count=len(rows), order=order, head=head, body="\n".join(body),
                        flags=trust.flags_section(rows) + trust.uncertainty_switch(rows), trust_style=trust.STYLE,
                        dice_note="" if not with_dice else
                        f" Dice shading: red &lt; {POOR:.2f} &le; amber &lt; {FAIR:.2f} &le; green.",
                        script=_SCRIPT)


def write_review_page(out: str | Path, cases: list[dict]) -> Path:
    """Write `review.html` into `out`, listing every case worst first.

    Args:
        out: output folder (the overlays' paths are relative to it).
        cases: one dict per case: `case` (name), `volumes_ml` ({organ: mL}), optional `dice`
            ({organ: value}, NaN for organs absent from both masks), `overlays` (PNG paths,
            relative to `out`; the one ending in `_thumb.png`, else `_axial.png`, is the thumbnail),
            `slice_files` (the slice report: profile PNG and slices.csv, linked) and `worst_slices`
            ({organ: {z_mm, dice}}, each organ's lowest-Dice slice, listed worst first).

    Returns:
        The page's path.
    """
    out = Path(out)
    return write_text(render_page(review_rows(cases), out), out / "review.html")


_SCRIPT = """
(function () {
  "use strict";
  var table = document.getElementById("cases");
  var heads = table.tHead.rows[0].cells;
  function value(row, col, numeric) {
    var cell = row.cells[col];
    var raw = cell.hasAttribute("data-value") ? cell.getAttribute("data-value") : cell.textContent;
    if (!numeric) { return raw.toLowerCase(); }
    var number = parseFloat(raw);
    return isNaN(number) ? null : number;
  }
  function sortBy(col, descending) {
    var numeric = heads[col].getAttribute("data-type") === "number";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = value(a, col, numeric), y = value(b, col, numeric);
      if (x === null || y === null) { return (x === null) - (y === null); }  /* blanks last */
      var order = x < y ? -1 : x > y ? 1 : 0;
      return descending ? -order : order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    for (var i = 0; i < heads.length; i++) { heads[i].removeAttribute("aria-sort"); }
    heads[col].setAttribute("aria-sort", descending ? "descending" : "ascending");
  }
  function keyed(key) {
    for (var i = 0; i < heads.length; i++) {
      if (heads[i].getAttribute("data-key") === key && heads[i].getAttribute("data-type")) { return i; }
    }
    return -1;
  }
  function clicked(col) {
    var descending = heads[col].getAttribute("aria-sort") === "ascending";
    sortBy(col, descending);
    var key = encodeURIComponent(heads[col].getAttribute("data-key"));
    history.replaceState(null, "", "#sort=" + (descending ? "-" : "") + key);
  }
  Array.prototype.forEach.call(heads, function (head, col) {
    if (!head.getAttribute("data-type")) { return; }
    head.addEventListener("click", function () { clicked(col); });
    head.addEventListener("keydown", function (event) { if (event.key === "Enter") { clicked(col); } });
  });
  function missing(img) {
    img.setAttribute("data-state", "missing");
    var note = document.createElement("span");
    note.className = "missing";
    note.textContent = "overlay not found: " + img.getAttribute("src");
    img.parentNode.replaceChild(note, img);
    console.error("medseg review: overlay not found: " + img.src);
  }
  Array.prototype.forEach.call(table.querySelectorAll("img.thumb"), function (img) {
    if (img.complete) {
      if (img.naturalWidth === 0) { missing(img); } else { img.setAttribute("data-state", "loaded"); }
      return;
    }
    img.addEventListener("load", function () { img.setAttribute("data-state", "loaded"); });
    img.addEventListener("error", function () { missing(img); });
  });
  var toggle = document.getElementById("show-uncertainty");  /* the uncertainty layer (medseg.review.flags) */
  if (toggle) {
    toggle.addEventListener("change", function () { table.classList.toggle("uncertainty", toggle.checked); });
  }
  var match = /^#sort=(-?)(.+)$/.exec(location.hash);
  if (match) {
    var col = keyed(decodeURIComponent(match[2]));
    if (col >= 0) { sortBy(col, match[1] === "-"); }
  }
  table.setAttribute("data-ready", "true");
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>medseg review: {count} cases</title>
<style>
  body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1em; color: #111; background: #fafafa; }}
  table {{ border-collapse: collapse; background: #fff; }}
  th, td {{ border: 1px solid #ddd; padding: 4px 8px; vertical-align: middle; }}
  th {{ position: sticky; top: 0; background: #eee; }}
  th[data-type]:not([data-type=""]) {{ cursor: pointer; }}
  th[aria-sort="ascending"]::after {{ content: " \\25B2"; }}
  th[aria-sort="descending"]::after {{ content: " \\25BC"; }}
  td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
  td.name {{ font-weight: 600; }}
  td.poor {{ background: #f8c9c4; }} td.fair {{ background: #fbe3b4; }} td.good {{ background: #d3efd5; }}
  img.thumb {{ max-height: 200px; max-width: 360px; display: block; }}
  td.empty, .missing {{ color: #a00; font-weight: 600; }}
  td.empty {{ max-width: 14em; }}
  .links a {{ margin-right: .6em; }}
  td.slices {{ font-size: 12px; white-space: nowrap; }}{trust_style}</style>
</head>
<body>
<h1>Segmentation review</h1>
<p>{count} cases, {order}. Click a column header to sort; click a thumbnail or view name for the full-size
overlay (axial seen from the feet: patient's right on image left).{dice_note}</p>
{flags}<table id="cases">
<thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody>
</table>
<script>{script}</script>
</body>
</html>
"""
