"""The review page: rows worst first, escaping, links; and the page itself in a real headless browser."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import blob_case, make_grid

from medseg.errors import InputError
from medseg.review.page import (
    empty_organs,
    mean_dice,
    render_page,
    review_rows,
    write_review_page,
)

NAN = float("nan")


def case(name, dice=None, volumes=None, overlays=()):
    return {"case": name, "volumes_ml": volumes or {"prostate": 20.0}, "dice": dice, "overlays": list(overlays)}


# ----------------------------------------------------------------------------------- rows as data


def test_mean_dice_skips_organs_absent_from_both_masks():
    assert mean_dice(case("a", {"prostate": 0.8, "bladder": NAN, "rectum": 0.6})) == pytest.approx(0.7)
    assert math.isnan(mean_dice(case("a", {"prostate": NAN})))
    assert math.isnan(mean_dice(case("a")))


def test_rows_are_worst_first_lowest_mean_dice_then_cases_without_dice():
    rows = review_rows([case("b", {"prostate": 0.9}), case("no-ref"), case("a", {"prostate": 0.9}),
                        case("worst", {"prostate": 0.2}), case("empty", {"prostate": NAN})])
    assert [r["case"] for r in rows] == ["worst", "a", "b", "empty", "no-ref"]


def test_without_dice_cases_with_empty_organs_come_first():
    rows = review_rows([case("ok", volumes={"prostate": 20.0, "bladder": 90.0}),
                        case("one", volumes={"prostate": 0.0, "bladder": 90.0}),
                        case("two", volumes={"prostate": 0.0, "bladder": 0.0})])
    assert [r["case"] for r in rows] == ["two", "one", "ok"]
    assert empty_organs(rows[0]) == ["prostate", "bladder"]


@pytest.mark.parametrize("bad, match", [
    pytest.param({"volumes_ml": {}}, r"review case #0 must be a mapping with a non-empty 'case' name",
                 id="no-name"),
    pytest.param({"case": "c", "dice": [0.5]}, r"review case 'c': 'dice' must map organ names to numbers",
                 id="dice-list"),
    pytest.param({"case": "c", "overlays": "c_axial.png"}, r"'overlays' must be a list of PNG paths",
                 id="overlays-str"),
    pytest.param({"case": "c", "worst_slices": {"prostate": 0.2}}, r"'worst_slices' must map organ names to \{z_mm",
                 id="worst-slices-number"),
])
def test_malformed_cases_are_input_errors(bad, match):
    with pytest.raises(InputError, match=match):
        review_rows([bad])


def test_page_escapes_names_and_links_overlays_relative_to_the_page(tmp_path):
    page = render_page([case("<b>&", {"prostate": 0.5}, overlays=[tmp_path / "png" / "x y_axial.png",
                                                                  "png/x y_thumb.png"])], tmp_path)
    assert "<b>&" not in page and 'data-case="&lt;b&gt;&amp;"' in page
    assert 'href="png/x%20y_axial.png"' in page and 'src="png/x%20y_thumb.png"' in page
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from a network
    assert "default-src 'none'" in page


def test_slice_reports_are_linked_and_worst_slices_below_fair_named(tmp_path):
    row = {**case("c", {"prostate": 0.8, "bladder": 0.9}), "slice_files": ["c_metrics/slices.csv",
                                                                         "c_metrics/profiles/c.png"],
           "worst_slices": {"bladder": {"z_mm": 31.25, "dice": 0.9}, "prostate": {"z_mm": -12.04, "dice": 0.1}}}
    page = render_page([row, case("plain", {"prostate": 0.9})], tmp_path)
    assert 'data-key="worst_slice"' in page
    assert '<a href="c_metrics/slices.csv">slices.csv</a> <a href="c_metrics/profiles/c.png">profile</a>' in page
    assert 'data-value="0.1"' in page and "prostate z -12.0 mm: Dice 0.10" in page
    assert "bladder z" not in page  # its worst slice is above FAIR
    assert 'data-key="worst_slice"' not in render_page([case("plain", {"prostate": 0.9})], tmp_path)


def test_size_columns_read_in_their_own_unit(tmp_path):
    """Microscopy areas (2D): nuclei of 80 um2 in µm², not "0.0 mm²"; a larger organ keeps mm² in its column."""
    rows = [{**case(name, volumes={"nucleus": 0.0, "dish": 0.0}), "areas_mm2": {"nucleus": area, "dish": 3.5}}
            for name, area in (("a", 8e-5), ("b", 1.25e-4))]
    page = render_page(rows, tmp_path)
    assert "nucleus<br>µm²" in page and "dish<br>mm²" in page
    assert '<td class="num" data-value="80.0">80.0</td>' in page and ">125</td>" in page and ">3.5</td>" in page
    assert render_page([case("ct", volumes={"prostate": 0.004})], tmp_path).count(">4.0</td>") == 1  # 4 mm³


def test_predict_with_a_reference_links_the_slice_report(predictions):
    for name in ("good", "poor"):
        assert (predictions / f"{name}_metrics" / "slices.csv").is_file()
        assert (predictions / f"{name}_metrics" / "profiles" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    page = (predictions / "review.html").read_text()
    assert 'href="poor_metrics/profiles/poor.png"' in page and 'href="poor_metrics/slices.csv"' in page
    assert "rectum z" in page and "every slice Dice &ge; 0.85" in page  # poor misses the rectum; good misses none


# --------------------------------------------------------------------------------- in a browser

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM = next((path for path in map(shutil.which, BROWSERS) if path), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (apt-get install chromium); "
                                                               ".ci/run installs it")
# Chromium logs every console message (log, warning, error, uncaught exception) as "CONSOLE(...)" lines.
CONSOLE = re.compile(r":CONSOLE[:(]\d*\)?\]\s*(.*)")
CLICKS = """<script>
  function order() {
    return Array.prototype.map.call(document.querySelectorAll("#cases tbody tr"),
                                    function (row) { return row.getAttribute("data-case"); }).join(" ");
  }
  function click(key) { document.querySelector('th[data-key="' + key + '"]').click(); return order(); }
  var body = document.body;
  body.setAttribute("data-dice-once", click("mean_dice"));
  body.setAttribute("data-dice-hash", location.hash);
  body.setAttribute("data-dice-twice", click("mean_dice"));
  body.setAttribute("data-name", click("case"));
  body.setAttribute("data-prostate-ml", click("ml:prostate"));
</script>
</body>"""


def open_in_chromium(page: Path, profile: Path, fragment: str = "") -> tuple[str, list[str]]:
    """The DOM of `page` after its scripts ran, and the console messages it caused."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--window-size=1600,4000",
               "--dump-dom", page.resolve().as_uri() + fragment]
    done = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [m.group(1) for m in map(CONSOLE.search, done.stderr.splitlines()) if m]


def rows_in(dom: str) -> list[str]:
    return re.findall(r'<tr data-case="([^"]*)"', dom)


@pytest.fixture(scope="module")
def predictions(tmp_path_factory) -> Path:
    """An output folder as `medseg predict --reference` leaves it, from `write_outputs` with three masks.

    The masks are the reference less some organs: 'good' misses none (mean Dice 1), 'fair' the rectum
    (0.8), 'poor' the rectum and both femoral heads (0.4). No model is trained.
    """
    from medseg.config import load_task
    from medseg.infer.batch import PredictOptions, write_outputs
    from medseg.infer.predictor import Segmentation
    from medseg.io import write_label_map

    task = load_task("prostate")
    out = tmp_path_factory.mktemp("predictions")
    grid = make_grid("RAS", shape=(32, 28, 12), spacing=(1.5, 1.5, 4.0))
    image, reference = blob_case(grid)
    rows = []
    for name, missed in (("good", ()), ("poor", (3, 4, 5)), ("fair", (3,))):
        reference_path = write_label_map(reference, grid, out / "references" / f"{name}.nii.gz")
        prediction = np.where(np.isin(reference, missed), 0, reference).astype(np.uint8)
        seg = Segmentation(prediction, grid, task.label_names)
        rows.append(write_outputs(seg, (image[None], grid), name, out, task, PredictOptions(), reference_path))
    write_review_page(out, rows)
    return out


def test_predict_writes_overlays_viewer_files_and_a_row_for_the_review_page(predictions):
    names = {p.name for p in predictions.iterdir() if p.name.startswith("poor")}
    expected = {"poor_seg.nii.gz", "poor.seg.nrrd", "poor_itksnap_labels.txt", "poor_volumes.json",
                "poor_axial.png", "poor_coronal.png", "poor_sagittal.png", "poor_thumb.png"}
    assert expected <= names
    page = (predictions / "review.html").read_text()
    assert rows_in(page) == ["poor", "fair", "good"]
    assert '<td class="num poor" data-value="0.4">0.400</td>' in page  # mean Dice of 'poor', shaded red


@needs_chromium
def test_review_page_loads_from_file_without_console_errors_and_shows_every_case(predictions, tmp_path):
    dom, console = open_in_chromium(predictions / "review.html", tmp_path / "profile")
    assert console == []
    assert 'id="cases" data-ready="true"' in dom  # the inline script ran to its end
    assert rows_in(dom) == ["poor", "fair", "good"]  # worst first
    thumbnails = re.findall(r'<img class="thumb" src="([^"]+)"[^>]*data-state="([a-z]+)"', dom)
    assert thumbnails == [(f"{name}_thumb.png", "loaded") for name in ("poor", "fair", "good")]
    for name in ("poor", "fair", "good"):
        for view in ("axial", "coronal", "sagittal"):
            assert f'href="{name}_{view}.png"' in dom and (predictions / f"{name}_{view}.png").is_file()


@needs_chromium
def test_review_page_sorts_by_clicked_column_and_by_url_fragment(predictions, tmp_path):
    page = predictions / "review_clicks.html"
    page.write_text((predictions / "review.html").read_text().replace("</body>", CLICKS))
    dom, console = open_in_chromium(page, tmp_path / "profile")
    assert console == []
    body = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', re.search(r"<body[^>]*>", dom).group(0)))
    assert body["dice-once"] == "good fair poor"  # the page opens sorted worst first: one click flips it
    assert body["dice-hash"] == "#sort=-mean_dice"
    assert body["dice-twice"] == "poor fair good"
    assert body["name"] == "fair good poor"
    assert body["prostate-ml"] == "fair good poor"  # equal volumes keep their order (a stable sort)

    dom, console = open_in_chromium(predictions / "review.html", tmp_path / "profile-2", "#sort=-dice:rectum")
    assert console == [] and rows_in(dom) == ["good", "poor", "fair"]  # rectum Dice 1, 0, 0 (stable)


@needs_chromium
def test_a_missing_overlay_is_shown_and_reported_on_the_console(tmp_path):
    write_review_page(tmp_path, [case("lost", {"prostate": 0.5}, overlays=["lost_axial.png"])])
    dom, console = open_in_chromium(tmp_path / "review.html", tmp_path / "profile")
    assert "overlay not found: lost_axial.png" in dom
    assert len(console) == 1 and "overlay not found" in console[0]
