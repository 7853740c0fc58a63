"""benchmarks/bench_deeplab.py: the DeepLab twin of each task file, and the instance figures it reports."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from medseg.config import load_task

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))  # the benchmarks are scripts, not a package
from bench_deeplab import instance_scores, task_files


@pytest.mark.parametrize("task", ["prostate", "cells"])
def test_the_deeplab_twin_differs_from_the_task_only_in_its_network(task, tmp_path):
    files = task_files(task, tmp_path)
    unet, deeplab = load_task(files["unet"]), load_task(files["deeplab"])
    assert deeplab.network.name == "deeplab" and deeplab.network.filters == unet.network.filters
    assert (deeplab.dimensions, deeplab.labels, deeplab.patch_size, deeplab.schedule) == (
        unet.dimensions, unet.labels, unet.patch_size, unet.schedule)


def test_instance_scores_are_the_means_and_the_pool():
    organ = {key: {"mean": value} for key, value in (("instance_f1", 0.8461), ("instance_precision", 0.9),
                                                      ("instance_recall", 0.8), ("pq", 0.7), ("aji", 0.75))}
    organ["instances_pooled"] = {"tp": 104, "fp": 18, "fn": 21, "f1": 0.84211, "pq": 0.72, "aji": 0.739}
    scores = instance_scores(organ)
    assert scores["mean_over_cases"]["instance_f1"] == 0.8461 and scores["pooled"]["f1"] == 0.8421
    assert scores["objects"] == {"tp": 104, "fp": 18, "fn": 21}
