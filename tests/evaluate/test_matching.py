"""medseg.evaluate.matching: predictions paired with references by case name."""

from __future__ import annotations

from conftest import blob_case, make_grid

from medseg.evaluate.matching import match_cases
from medseg.io import write_label_map


def test_match_cases_strips_seg_and_reports_missing(folders):
    preds, refs = folders
    pairs, lone_preds, lone_refs = match_cases(preds, refs)
    assert [(case, p.name, r.name) for case, p, r in pairs] == [
        ("case_0", "case_0_seg.nii.gz", "case_0.nii.gz"), ("case_1", "case_1_seg.nii.gz", "case_1.nii.gz")]
    assert (lone_preds, lone_refs) == (["stray"], ["case_2"])


def test_a_predict_output_folder_is_matched_by_its_masks_alone(folders):
    """Probability maps and 3D Slicer copies beside the `_seg` masks are not predictions."""
    preds, refs = folders
    (preds / "stray_seg.nii.gz").unlink()
    grid = make_grid("LPS", shape=(40, 36, 24))
    _, labels = blob_case(grid, 0)
    write_label_map(labels, grid, preds / "case_0.seg.nrrd")
    write_label_map(labels, grid, preds / "case_0_prob_bladder.nii.gz")
    pairs, lone_preds, lone_refs = match_cases(preds, refs)
    assert [(name, p.name) for name, p, _ in pairs] == [("case_0", "case_0_seg.nii.gz"), ("case_1", "case_1_seg.nii.gz")]
    assert lone_preds == [] and lone_refs == ["case_2"]
