"""The review page's trust parts: the flags at the top, worst first, and the uncertainty switch, also in a
real headless browser."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import blob_case, make_grid
from test_page import needs_chromium, open_in_chromium, rows_in

from medseg.errors import InputError
from medseg.review.flags import case_severity, flags_section
from medseg.review.page import render_page, review_rows, write_review_page


def flag(organ, check, severity, reason="why"):
    return {"organ": organ, "check": check, "reason": reason, "severity": severity}


CASES = [
    {"case": "calm", "volumes_ml": {"prostate": 20.0}, "flags": []},
    {"case": "odd", "volumes_ml": {"prostate": 20.0}, "flags": [flag("prostate", "pieces", 1.8)]},
    {"case": "wrong", "volumes_ml": {"prostate": 20.0},
     "flags": [flag("femoral_head_left", "side", 3.0, "lies on the <patient's> right"), flag("bladder", "volume", 2.0)]},
]


def test_flags_are_listed_worst_first_and_cases_without_dice_by_their_flags(tmp_path):
    assert case_severity(CASES[2]) == 5.0 and case_severity(CASES[0]) == 0.0
    assert [row["case"] for row in review_rows(CASES)] == ["wrong", "odd", "calm"]
    section = flags_section(CASES)
    assert re.findall(r'data-flag-case="(\w+)"><td><a href="#case-\w+">\w+</a></td><td>(\w+)</td>', section) == [
        ("wrong", "femoral_head_left"), ("wrong", "bladder"), ("odd", "prostate")]
    assert "lies on the &lt;patient&#x27;s&gt; right" in section
    page = render_page(review_rows(CASES), tmp_path)
    assert page.index('id="flags"') < page.index('id="cases"') and 'id="case-wrong"' in page
    assert flags_section(CASES[:1]) == ""
    assert 'id="show-uncertainty"' not in page  # no case has an uncertainty picture


def test_malformed_flags_are_input_errors():
    with pytest.raises(InputError, match=r"review case 'x': 'flags' must be a list of \{organ, check, reason"):
        review_rows([{"case": "x", "flags": [{"organ": "bladder"}]}])


@pytest.fixture
def page_with_layers(tmp_path):
    """A review page of two predicted cases, each with its uncertainty picture and flags."""
    from medseg.config import load_task
    from medseg.infer.batch import PredictOptions, write_outputs
    from medseg.infer.predictor import Segmentation

    task = load_task("prostate")
    grid = make_grid("RAS", shape=(32, 28, 12), spacing=(1.5, 1.5, 4.0))
    image, labels = blob_case(grid)
    rows = []
    for name, severity in (("low", 1.2), ("high", 3.0)):
        uncertainty = np.where(labels > 0, 0.3, 0.0).astype(np.float32)
        seg = Segmentation(labels, grid, task.label_names, uncertainty=uncertainty,
                           flags=[flag("bladder", "volume", severity)])
        rows.append(write_outputs(seg, (image[None], grid), name, tmp_path, task, PredictOptions(), None))
    write_review_page(tmp_path, rows)
    return tmp_path


def test_each_row_carries_its_uncertainty_picture(page_with_layers):
    page = (page_with_layers / "review.html").read_text()
    assert rows_in(page) == ["high", "low"]
    assert 'id="show-uncertainty"' in page
    assert '<img class="uncertainty" src="high_uncertainty.png"' in page
    assert '<a href="high_uncertainty.png">uncertainty</a>' in page


SWITCH = """<script>
  var box = document.getElementById("show-uncertainty");
  document.body.setAttribute("data-before", document.getElementById("cases").className);
  box.click();
  document.body.setAttribute("data-after", document.getElementById("cases").className);
  var shown = document.querySelector("img.uncertainty");
  document.body.setAttribute("data-shown", getComputedStyle(shown).display);
  document.body.setAttribute("data-thumb", getComputedStyle(document.querySelector("img.thumb")).display);
</script>
</body>"""


@needs_chromium
def test_the_uncertainty_switch_swaps_the_pictures_in_a_browser(page_with_layers, tmp_path):
    page = page_with_layers / "review_switch.html"
    page.write_text((page_with_layers / "review.html").read_text().replace("</body>", SWITCH))
    dom, console = open_in_chromium(page, tmp_path / "profile")
    assert console == []
    assert 'id="cases" data-ready="true"' in dom  # the inline script ran to its end
    body = dict(re.findall(r'data-([a-z]+)="([^"]*)"', re.search(r"<body[^>]*>", dom).group(0)))
    assert body["before"] == "" and body["after"] == "uncertainty"
    assert body["shown"] == "block" and body["thumb"] == "none"
    assert re.findall(r'data-flag-case="(\w+)"', dom) == ["high", "low"]  # the flags, worst first, at the top
