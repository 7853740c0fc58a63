"""Slice-wise reports: hand-worked slice Dice and areas, the head-foot axis in any voxel order, the worst
slices, the profile plot, and `medseg evaluate` writing them end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DIRECTIONS, blob_case, make_grid

from medseg.cli import main
from medseg.evaluate.profile import profile_path, write_profiles
from medseg.evaluate.slices import (
    COLUMNS,
    format_worst,
    head_foot_axis,
    rows_to_csv,
    slice_counts,
    slice_rows,
    worst_slices,
)
from medseg.io import Grid, read_label, write_label_map

PNG = b"\x89PNG\r\n\x1a\n"


def hand_case() -> tuple[np.ndarray, np.ndarray, Grid]:
    """Three 4x4 slices along z (LPS), pixels 0.5 x 2 mm = 1 mm², slices 3 mm apart from z = 10 mm.

    Organ 1: slice 0 reference 4 px, prediction 2 of them (Dice 2*2/(4+2) = 2/3); slice 1 empty in
    both (NaN); slice 2 reference 2 px, prediction none (Dice 0). Organ 2: prediction only, slice 2.
    Organ 3: in neither mask.
    """
    ref, pred = np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8)
    ref[0:2, 0:2, 0] = 1
    pred[0:2, 0, 0] = 1
    ref[3, 2:4, 2] = 1
    pred[0, 3, 2] = 2
    grid = Grid((4, 4, 3), (0.5, 2.0, 3.0), (0.0, 0.0, 10.0), tuple(np.eye(3).ravel()))
    return ref, pred, grid


ORGANS = {1: "prostate", 2: "bladder", 3: "rectum"}


def by_slice(rows) -> dict:
    return {(r["organ"], r["k"]): r for r in rows}


def test_hand_worked_slice_dice_areas_and_empty_rules():
    ref, pred, grid = hand_case()
    rows = slice_rows(ref, pred, grid, ORGANS, case="c")
    found = by_slice(rows)
    assert set(found) == {("prostate", 0), ("prostate", 1), ("prostate", 2), ("bladder", 2)}  # no rectum rows
    first, gap, last = found["prostate", 0], found["prostate", 1], found["prostate", 2]
    assert (first["z_mm"], gap["z_mm"], last["z_mm"]) == pytest.approx((10.0, 13.0, 16.0))
    assert (first["ref_area_mm2"], first["pred_area_mm2"], first["dice"]) == pytest.approx((4.0, 2.0, 2 / 3))
    assert math.isnan(gap["dice"]) and gap["ref_area_mm2"] == gap["pred_area_mm2"] == 0  # both empty: NaN
    assert (last["ref_area_mm2"], last["pred_area_mm2"], last["dice"]) == (2.0, 0.0, 0.0)  # one empty: 0
    assert (found["bladder", 2]["ref_area_mm2"], found["bladder", 2]["pred_area_mm2"]) == (0.0, 1.0)
    assert found["bladder", 2]["dice"] == 0.0
    assert not slice_rows(ref, pred, grid, ORGANS, not_contoured={"prostate", "bladder"})
    header, *lines = rows_to_csv(rows).splitlines()
    assert header == ",".join(COLUMNS) and lines[0] == "c,prostate,0,10.0,4.0,2.0,0.666667" and "nan" in lines[1]


def test_slice_counts_are_per_slice_confusion_counts():
    ref, pred, _ = hand_case()
    tp, fp, fn = slice_counts(ref == 1, pred == 1, axis=2)
    assert tp.tolist() == [2, 0, 0] and fp.tolist() == [0, 0, 0] and fn.tolist() == [2, 0, 2]
    tp, fp, fn = slice_counts(ref == 1, pred == 1, axis=0)  # sagittal slabs: x = 0..3
    assert tp.tolist() == [1, 1, 0, 0] and fn.tolist() == [1, 1, 0, 2]


@pytest.mark.parametrize("orientation, axis", [
    pytest.param("LPS", 2, id="LPS"), pytest.param("RAS", 2, id="RAS"), pytest.param("PLI", 2, id="PLI"),
    pytest.param("oblique", 2, id="oblique"),
])
def test_head_foot_axis_of_the_fixture_orientations(orientation, axis):
    assert head_foot_axis(DIRECTIONS[orientation].ravel()) == axis


def test_same_anatomy_in_two_voxel_orders_gives_the_same_rows_by_z(tmp_path):
    """An LPS label map, and the same voxels reordered (permuted and flipped: the head-foot axis becomes
    voxel axis 0, running feet-ward) as `sitk.DICOMOrient` writes them: equal rows per z position."""
    grid = make_grid("LPS", shape=(30, 26, 14), spacing=(1.2, 1.1, 2.5))
    ref = blob_case(grid, 0)[1]
    pred = np.roll(ref, 1, axis=2)
    rows = {}
    for name, orient in (("lps", None), ("irp", "IRP")):
        paths = [write_label_map(m, grid, tmp_path / name / f"{k}.nii.gz") for k, m in (("ref", ref), ("pred", pred))]
        if orient:
            for path in paths:
                sitk.WriteImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), orient), str(path))
        (ref_map, ref_grid), (pred_map, _) = read_label(paths[0]), read_label(paths[1])
        rows[name] = slice_rows(ref_map, pred_map, ref_grid, None, case="c")
        if orient:
            assert head_foot_axis(ref_grid.direction) == 0 and ref_grid.direction[6] < 0  # axis 0 runs to -z
    def key(r):
        return (r["organ"], round(r["z_mm"], 3), r["ref_area_mm2"], r["pred_area_mm2"],
                None if math.isnan(r["dice"]) else round(r["dice"], 9))

    assert [key(r) for r in rows["lps"]] == [key(r) for r in rows["irp"]]
    assert len(rows["lps"]) > 20 and [r["k"] for r in rows["lps"]] != [r["k"] for r in rows["irp"]]
    z = [r["z_mm"] for r in rows["irp"] if r["organ"] == "label_1"]
    assert z == sorted(z)  # inferior to superior, whatever the file's order


def test_worst_slices_are_named_per_case_and_organ():
    ref, pred, grid = hand_case()
    worst = worst_slices(slice_rows(ref, pred, grid, ORGANS, case="c"), count=3)
    prostate = worst["prostate"]["c"]
    assert [e["k"] for e in prostate["lowest_dice"]] == [2, 0]  # the both-empty slice is never "worst"
    assert prostate["lowest_dice"][0] == {"k": 2, "z_mm": 16.0, "dice": 0.0, "ref_area_mm2": 2.0,
                                          "pred_area_mm2": 0.0}
    assert prostate["ref_only_z_mm"] == [16.0] and prostate["pred_only_z_mm"] == []
    assert worst["bladder"]["c"]["pred_only_z_mm"] == [16.0] and "rectum" not in worst
    text = format_worst(worst)
    assert "prostate: c z 16.0 Dice 0.00 (2/0)" in text and "one mask only: 1 ref, 0 pred" in text


def test_worst_ties_go_to_the_larger_disagreement():
    rows = [{"case": "c", "organ": "o", "k": k, "z_mm": float(k), "ref_area_mm2": area, "pred_area_mm2": 0.0,
             "dice": 0.0} for k, area in ((0, 5.0), (1, 50.0), (2, 20.0))]
    assert [e["k"] for e in worst_slices(rows, count=2)["o"]["c"]["lowest_dice"]] == [1, 2]


def test_profile_plot_is_written_per_case(tmp_path):
    ref, pred, grid = hand_case()
    rows = slice_rows(ref, pred, grid, ORGANS, case="a") + slice_rows(ref, ref, grid, ORGANS, case="b")
    paths = write_profiles(rows, tmp_path, {"prostate": (230, 25, 75)}, worst_slices(rows))
    assert paths == [profile_path(tmp_path, "a"), profile_path(tmp_path, "b")] == [tmp_path / "profiles" / "a.png",
                                                                                 tmp_path / "profiles" / "b.png"]
    from matplotlib.image import imread

    picture = imread(paths[0])
    assert paths[0].read_bytes()[:8] == PNG and picture.shape[0] > 300 and picture.shape[1] > 500
    assert not any(p.name.startswith(".") for p in (tmp_path / "profiles").iterdir())  # no temporary left


def test_rows_refuse_a_grid_of_another_shape():
    ref, pred, grid = hand_case()
    with pytest.raises(ValueError, match=r"one shape"):
        slice_rows(ref, pred, Grid((4, 4, 2), grid.spacing, grid.origin, grid.direction), ORGANS)


# ------------------------------------------------------------------------------------------ CLI


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_evaluate_cli_writes_slices_csv_profiles_and_names_the_worst_slices(folders, tmp_path, capsys):
    """The fixture's predictions are their references shifted one voxel along x, and case_1 misses the
    rectum: every rectum slice of case_1 is reference-only."""
    preds, refs = folders
    out = tmp_path / "evaluation"
    try:
        code = main(["evaluate", "--pred", str(preds), "--ref", str(refs), "--task", "prostate", "-o", str(out)])
    except SystemExit as done:
        code = done.code or 0
    assert code == 0
    printed = capsys.readouterr().out

    rows = read_csv(out / "slices.csv")
    assert list(rows[0]) == list(COLUMNS)
    assert {r["case"] for r in rows} == {"case_0", "case_1"}
    rectum = [r for r in rows if r["case"] == "case_1" and r["organ"] == "rectum"]
    assert rectum and all(float(r["pred_area_mm2"]) == 0 and float(r["dice"]) == 0 for r in rectum)
    areas = sum(float(r["ref_area_mm2"]) for r in rows if r["case"] == "case_0" and r["organ"] == "bladder")
    ref, grid = read_label(refs / "case_0.nii.gz")
    assert areas * grid.spacing[2] / 1000 == pytest.approx(np.count_nonzero(ref == 2) * grid.voxel_volume_ml)

    summary = json.loads((out / "summary.json").read_text())
    worst = summary["rectum"]["worst_slices"]["case_1"]
    assert len(worst["lowest_dice"]) == 3 and len(worst["ref_only_z_mm"]) == len(rectum)
    assert [p.name for p in sorted((out / "profiles").iterdir())] == ["case_0.png", "case_1.png"]
    assert (out / "profiles" / "case_1.png").read_bytes()[:8] == PNG
    assert "worst slices" in printed and "rectum: case_1 z" in printed


def test_2d_images_get_no_slice_report_and_the_summary_says_so(nuclei, tmp_path, capsys):
    """Microscopy (one slice per image): no slices.csv or profiles; distances in µm in the printed table."""
    root, task = nuclei
    preds = tmp_path / "preds"
    preds.mkdir()
    for ref in sorted((root / "labelsTr").iterdir()):
        image = sitk.ReadImage(str(ref))
        shifted = sitk.GetImageFromArray(np.roll(sitk.GetArrayFromImage(image), 1, axis=1))  # one pixel along x
        shifted.CopyInformation(image)
        sitk.WriteImage(shifted, str(preds / ref.name))
    labels, grid = read_label(root / "labelsTr" / "n0.nii.gz", dimensions=2)
    assert grid.shape == (64, 64, 1) and slice_rows(labels, labels, grid, {1: "nucleus"}) == []

    out = tmp_path / "evaluation"
    assert main(["evaluate", "--pred", str(preds), "--ref", str(root / "labelsTr"), "--task", str(task),
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert not (out / "slices.csv").exists() and not (out / "profiles").exists()
    note = json.loads((out / "summary.json").read_text())["all"]["slices"]
    assert note["skipped_cases"] == ["n0", "n1", "n2"] and note["slice_report_written"] is False
    assert "no slice report for 3 2D image(s): one slice each" in printed
    assert "wrote metrics.csv, summary.json and dice_boxplot.png to" in printed
    header, _, row = printed.splitlines()[:3]
    assert header.split() == ["organ", "Dice", "HD95", "µm", "ASSD", "µm", "SurfDice", "tol", "mm", "n", "empty", "inf"]
    assert row.split()[2] == "0.50"  # HD95 of a one-pixel shift: 0.5 um, not "0.00" mm
