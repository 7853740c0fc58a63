"""`medseg evaluate` with instance metrics: reference instance maps found beside the labels or in a folder,
predicted ones read beside the mask or split from it; real 2D NIfTI files of the cells phantom."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli import main
from medseg.data.phantom.cells import write_cells_dataset
from medseg.errors import InputError
from medseg.evaluate.instance_cases import predicted_instances, read_instances, reference_instances
from medseg.evaluate.run import run_evaluation


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """A cells dataset of 1 training and 2 test fields, and predictions: the references copied as masks,
    case 001 with its true instance map beside it, case 002 without (evaluate splits its mask)."""
    root = tmp_path_factory.mktemp("cells")
    data = write_cells_dataset(root / "data", n_train=1, n_test=2)
    pred = root / "pred"
    pred.mkdir()
    for case in ("cells_001", "cells_002"):
        shutil.copy(data / "labelsTs" / f"{case}.nii.gz", pred / f"{case}_seg.nii.gz")
    shutil.copy(data / "instancesTs" / "cells_001.nii.gz", pred / "cells_001_instances.nii.gz")
    return data, pred


def _values(out, case, metric):
    rows = (line.split(",") for line in (out / "metrics.csv").read_text().splitlines()[1:])
    return float(next(r[3] for r in rows if r[0] == case and r[1] == "nucleus" and r[2] == metric))


def test_finds_the_instance_maps(cells):
    data, pred = cells
    assert reference_instances(data / "labelsTs" / "cells_001.nii.gz", None) == data / "instancesTs" / "cells_001.nii.gz"
    assert reference_instances(data / "labelsTs" / "cells_001.nii.gz", data / "instancesTr") is None
    assert predicted_instances(pred / "cells_001_seg.nii.gz") == pred / "cells_001_instances.nii.gz"
    assert predicted_instances(pred / "cells_002_seg.nii.gz") is None
    ids, grid = read_instances(data / "instancesTs" / "cells_001.nii.gz")
    assert ids.shape == (256, 256, 1) and grid.shape == (256, 256, 1) and ids.max() >= 8


def test_scores_per_case_mean_and_pooled(cells, tmp_path):
    data, pred = cells
    warnings = []
    summary = run_evaluation(pred, data / "labelsTs", tmp_path, task="cells", warn=warnings.append)
    assert warnings == []
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "instancesTs" / "cells_001.nii.gz")))
    assert _values(tmp_path, "cells_001", "instances_ref") == _values(tmp_path, "cells_001", "instances_pred") == truth.max()
    for metric in ("instance_f1", "pq", "aji", "sq"):
        assert _values(tmp_path, "cells_001", metric) == 1.0  # its own instance map: perfect
    # case 002's mask split by the watershed: touching nuclei mostly come apart
    assert 0.85 <= _values(tmp_path, "cells_002", "instance_f1") <= 1.0
    nucleus = json.loads((tmp_path / "summary.json").read_text())["nucleus"]
    assert nucleus["instance_f1"]["n"] == 2
    pooled = nucleus["instances_pooled"]
    assert pooled["tp"] + pooled["fn"] == _values(tmp_path, "cells_001", "instances_ref") + \
        _values(tmp_path, "cells_002", "instances_ref")
    assert summary["nucleus"]["instances_pooled"] == pooled
    assert "instance_f1" not in summary["cell"]  # the task names nucleus only


def test_instances_folder_and_missing_references(cells, tmp_path):
    data, pred = cells
    warnings = []
    run_evaluation(pred, data / "labelsTs", tmp_path / "a", task="cells", instances=data / "instancesTr",
                   warn=warnings.append)
    assert "no reference instance map in" in warnings[0] and "cells_001, cells_002" in warnings[0]
    assert "instance_f1" not in (tmp_path / "a" / "metrics.csv").read_text()
    with pytest.raises(InputError, match="--instances needs --task"):
        run_evaluation(pred, data / "labelsTs", tmp_path / "b", instances=data / "instancesTs")


def test_cli_prints_instance_scores(cells, tmp_path, capsys):
    data, pred = cells
    assert main(["evaluate", "--pred", str(pred), "--ref", str(data / "labelsTs"), "--task", "cells",
                 "-o", str(tmp_path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("nucleus instances"))
    assert "mean of 2 case(s): F1@0.5" in line and "pooled F1" in line


def test_bad_instance_map(tmp_path):
    image = sitk.GetImageFromArray(np.full((4, 5), -1, np.int16))
    sitk.WriteImage(image, str(tmp_path / "x.nii.gz"))
    with pytest.raises(InputError, match="instance ids must be 0"):
        read_instances(tmp_path / "x.nii.gz")
