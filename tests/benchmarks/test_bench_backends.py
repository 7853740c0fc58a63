"""benchmarks/bench_backends.py's agreement part on given cases of a partially labelled dataset."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from conftest import partial_blob_dataset

from medseg.errors import InputError
from medseg.infer.backends import openvino_version

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))  # the benchmarks are scripts, not a package
import bench_backends  # not `from ... import test_cases`: pytest would collect it as a test

needs_openvino = pytest.mark.skipif(openvino_version() is None, reason='needs pip install "medseg[openvino]"')


@pytest.fixture(scope="module")
def other_data(tmp_path_factory) -> Path:
    """Two blob cases the tiny model never saw; hn_1 did not contour the rectum (and has none drawn)."""
    root = tmp_path_factory.mktemp("other_data")
    partial_blob_dataset(root, ["LPS", "RAS"], first_seed=30)
    return root


def test_given_cases_of_another_dataset_in_the_order_given(tiny_model, other_data):
    cases = bench_backends.test_cases(tiny_model, 4, other_data, ["hn_1", "hn_0"])

    assert [case.name for case in cases] == ["hn_1", "hn_0"]
    assert cases[0].contoured == ("prostate", "bladder", "femoral_head_left", "femoral_head_right")
    with pytest.raises(InputError, match=r"other_data\d*: no case hn_7, hn_9$"):
        bench_backends.test_cases(tiny_model, 4, other_data, ["hn_0", "hn_9", "hn_7"])


@needs_openvino
def test_agreement_scores_only_the_organs_each_case_contoured(tiny_model, other_data, tmp_path):
    model = Path(shutil.copytree(tiny_model, tmp_path / "model", ignore=shutil.ignore_patterns(".*", "openvino")))

    result = bench_backends.bench_agreement(model, False, bench_backends.test_cases(model, 4, other_data, ["hn_0", "hn_1"]))

    organs = ["prostate", "bladder", "rectum", "femoral_head_left", "femoral_head_right"]
    assert result["cases"] == 2 and list(result["summary"]) == ["openvino_f32"]
    assert list(result["per_case"]["hn_0"]["dice_torch_fp32"]) == organs
    assert list(result["per_case"]["hn_1"]["dice_torch_fp32"]) == [o for o in organs if o != "rectum"]
    assert "rectum" not in result["per_case"]["hn_1"]["openvino_f32"]["dice_change"]
    assert 0.99 <= result["summary"]["openvino_f32"]["worst_agreement"] <= 1.0


@needs_openvino
def test_int8_variant_is_left_out_where_the_model_has_no_passed_check(tiny_model, tmp_path):
    model = Path(shutil.copytree(tiny_model, tmp_path / "model", ignore=shutil.ignore_patterns(".*", "openvino")))

    bundles, about = bench_backends.int8_variant(model)

    assert bundles == {}
    assert about["skipped"].startswith(f"{model}: ")  # the reason `medseg predict --precision int8` gives
