"""`medseg predict` end to end: a tiny trained model, real files, SimpleITK checks of every written grid."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import blob_case, make_grid
from test_io import write_dicom_series

from medseg.cli import main
from medseg.infer.batch import find_model
from medseg.io import read_image, write_image


def digest(path: Path) -> str:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files if f.is_file())).hexdigest()


def assert_same_grid(written: Path, source: Path | sitk.Image) -> None:
    mask = sitk.ReadImage(str(written))
    if not isinstance(source, sitk.Image):
        source = sitk.ReadImage(str(source))
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert mask.GetSize() == source.GetSize()
    np.testing.assert_allclose(mask.GetSpacing(), source.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(mask.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(mask.GetDirection(), source.GetDirection(), atol=1e-6)


@pytest.fixture
def scans(tmp_path) -> Path:
    """A folder of three scans: a NIfTI in LPS, an NRRD in an oblique orientation, and a broken file."""
    folder = tmp_path / "scans"
    for name, orientation, suffix in [("lps_case", "LPS", ".nii.gz"), ("oblique_case", "oblique", ".nrrd")]:
        grid = make_grid(orientation, shape=(44, 40, 20), spacing=(1.5, 1.4, 3.0))
        image, _ = blob_case(grid, seed=7)
        write_image(image, grid, folder / f"{name}{suffix}")
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    return folder


def test_folder_is_segmented_and_a_bad_file_is_skipped(tiny_model, scans, tmp_path, capsys):
    before = digest(scans)
    out = tmp_path / "out"

    code = main(["predict", str(scans), "-o", str(out), "-m", str(tiny_model), "--probabilities"])

    assert code == 1  # one input failed
    err = capsys.readouterr().err
    assert "broken.nii.gz: not a readable image" in err
    assert "2 of 3 scans segmented" in err
    for case, suffix in [("lps_case", ".nii.gz"), ("oblique_case", ".nrrd")]:
        assert_same_grid(out / f"{case}_seg.nii.gz", scans / f"{case}{suffix}")
        volumes = json.loads((out / f"{case}_volumes.json").read_text())
        assert set(volumes["organs"]) == {"prostate", "bladder", "rectum", "femoral_head_left", "femoral_head_right"}
        assert {"read", "preprocess", "inference", "resample", "write"} <= set(volumes["seconds"])
        assert (out / f"{case}_prob_bladder.nii.gz").is_file()
        assert (out / f"{case}_axial.png").is_file()
    assert not list(out.glob("broken*"))  # nothing written for the bad input
    assert not list(out.glob(".*tmp*"))  # no temporary files left behind
    summary = json.loads((out / "summary.json").read_text())
    assert [c["case"] for c in summary["cases"]] == ["lps_case", "oblique_case"]
    assert summary["failed"][0]["input"].endswith("broken.nii.gz")
    assert (out / "review.html").is_file()
    assert digest(scans) == before  # inputs untouched


def test_dicom_series_and_reference_metrics(tiny_model, tmp_path):
    grid = make_grid("PLI", shape=(40, 36, 12), spacing=(1.5, 1.5, 3.0))
    image, labels = blob_case(grid, seed=2)
    series = tmp_path / "series"
    write_dicom_series(image, grid, series)
    source = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
    _, read_grid = read_image(series)
    from medseg.io import write_label_map

    reference = write_label_map(labels, read_grid, tmp_path / "refs" / "series.nii.gz")
    out = tmp_path / "out"

    assert main(["predict", str(series), "-o", str(out), "-m", str(tiny_model), "-r", str(reference),
                 "--no-overlays"]) == 0

    assert_same_grid(out / "series_seg.nii.gz", source)
    metrics = json.loads((out / "series_metrics" / "summary.json").read_text())
    assert "dice" in metrics["bladder"]
    dice = metrics["bladder"]["dice"]["mean"]
    assert 0.0 <= dice <= 1.0


def test_api_matches_cli(tiny_model, tmp_path):
    """`Predictor(model_dir).predict(path)` is what the CLI writes."""
    from medseg import Predictor

    grid = make_grid("RAS", shape=(36, 36, 16), spacing=(1.5, 1.5, 3.0))
    image, _ = blob_case(grid, seed=5)
    path = write_image(image, grid, tmp_path / "scan.nii.gz")
    seg = Predictor(tiny_model, device="cpu").predict(path)
    assert main(["predict", str(path), "-o", str(tmp_path / "out"), "-m", str(tiny_model), "--no-overlays",
                 "--device", "cpu"]) == 0  # the same device as the API call: bf16 on a GPU differs slightly
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "scan_seg.nii.gz"))).transpose(2, 1, 0)
    assert np.array_equal(seg.labels, written)


def test_no_model_says_how_to_train(tmp_path):
    with pytest.raises(ValueError, match="train one with `medseg train --task prostate`"):
        find_model("prostate", runs=tmp_path / "runs")


def test_without_a_model_predict_takes_the_newest_run_or_finished_cross_validation(tiny_model, tiny_dataset, tmp_path,
                                                                                     monkeypatch, capsys):
    """runs/tiny/: a run folder, a cross-validation folder of 2 folds and, newest of all, one with 2 of its 3
    folds: the unfinished one is never taken, the others by their newest best.pt."""
    runs = tmp_path / "runs" / "tiny"
    ignore = shutil.ignore_patterns("cache", "tensorboard")
    shutil.copytree(tiny_model, runs / "single", ignore=ignore)
    for name, folds in (("cv", 2), ("unfinished", 3)):
        for k in range(2):
            shutil.copytree(tiny_model, runs / name / f"fold_{k}", ignore=ignore)
        (runs / name / "crossval.json").write_text(json.dumps({"folds": folds, "seed": 0}))
    for checkpoint, seconds in (("single", 1000), ("cv/fold_0", 3000), ("cv/fold_1", 2000),
                                ("unfinished/fold_0", 5000), ("unfinished/fold_1", 5000)):
        os.utime(runs / checkpoint / "best.pt", (seconds, seconds))
    assert find_model("tiny", tmp_path / "runs") == runs / "cv"
    os.utime(runs / "single" / "best.pt", (4000, 4000))
    assert find_model("tiny", tmp_path / "runs") == runs / "single"
    os.utime(runs / "single" / "best.pt", (1000, 1000))

    grid = make_grid("LPS", shape=(36, 36, 16), spacing=(1.5, 1.5, 3.0))
    scan = write_image(blob_case(grid, seed=5)[0], grid, tmp_path / "scan.nii.gz")
    monkeypatch.chdir(tmp_path)  # runs/ is looked for in the working folder
    assert main(["predict", str(scan), "--task", str(tiny_dataset[1]), "-o", "out", "--no-overlays",
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    cv = Path("runs", "tiny", "cv")
    assert f"model: {cv} (the newest for task 'tiny'; a cross-validation folder: the ensemble of its 2 folds)" in err
    summary = json.loads(Path("out", "summary.json").read_text())
    assert summary["model"] == str(cv)
    assert "confidence" in json.loads(Path("out", "scan_volumes.json").read_text())["organs"]["bladder"]  # an ensemble


@pytest.mark.parametrize("orientation", ["LPS", "oblique"])
def test_overlays_cut_to_the_organs_are_the_same_pictures(orientation, tmp_path):
    """`medseg predict` draws from the organs' box plus margin: the PNGs must not change by a byte."""
    import yaml
    from conftest import TINY_TASK

    from medseg.config import parse_task
    from medseg.infer.batch import around_organs
    from medseg.infer.predictor import Segmentation
    from medseg.review.overlays import write_overlays

    task = parse_task(yaml.safe_load(TINY_TASK), "tiny.yaml")
    grid = make_grid(orientation, shape=(120, 110, 40), spacing=(1.0, 1.0, 2.0))
    image, labels = blob_case(grid, seed=3)
    labels = np.asfortranarray(np.where(np.isin(labels, [2, 4]), labels, 0).astype(np.uint8))
    seg = Segmentation(labels, grid, task.label_names)
    (image_cut, image_grid), (mask_cut, mask_grid) = around_organs(seg, (image[None], grid))
    assert mask_cut.size < labels.size and mask_grid == image_grid
    assert np.count_nonzero(mask_cut) == np.count_nonzero(labels)
    whole = write_overlays((image[None], grid), (labels, grid), task, tmp_path / "whole", case="c")
    cut = write_overlays((image_cut, image_grid), (mask_cut, mask_grid), task, tmp_path / "cut", case="c")
    assert [digest(a) for a in whole] == [digest(b) for b in cut]
    assert seg.volumes() == Segmentation(labels.copy(), grid, task.label_names).volumes()
    empty = Segmentation(np.zeros_like(labels), grid, task.label_names)
    assert around_organs(empty, (image[None], grid))[1][0] is empty.labels
    assert all(v["voxels"] == 0 for v in empty.volumes().values())


def test_a_2d_case_line_shows_areas_in_the_unit_that_reads(capsys):
    """Microscopy areas are thousandths of a mm² (the line read "nucleus 0.0 mm²"): µm² here."""
    import logging

    from medseg.infer.batch import _print_case

    row = {"case": "cells_016", "seconds": {"inference": 0.1}, "volumes_ml": {"nucleus": 1.2e-6, "cell": 4.3e-6},
           "areas_mm2": {"nucleus": 0.0012344, "cell": 0.0433}, "flags": []}
    _print_case(row, logging.getLogger("test"))
    assert capsys.readouterr().err == "cells_016: nucleus 1234 µm², cell 0.043 mm² (inference 0.10 s)\n"
