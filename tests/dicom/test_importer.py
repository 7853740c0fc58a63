"""DICOM-RT import: a clinic-style folder becomes an MSD dataset whose masks lie on the CT grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from phantoms import FEET_FIRST, HEAD_FIRST, ct_of, phantom_grid, phantom_organs

from medseg.cli import main
from medseg.config import load_task
from medseg.data.phantom import LABELS
from medseg.data.phantom.clinic import clinic_case
from medseg.dicom.ct import Patient, write_ct_series
from medseg.dicom.importer import paint
from medseg.dicom.reference import Structure
from medseg.dicom.rtstruct import write_rtstruct
from medseg.io import Grid, read_image, read_label

PROSTATE = load_task("prostate")


def write_patient(root: Path, patient_id: str, names: dict[int, str], direction=HEAD_FIRST,
                  labels: np.ndarray | None = None) -> tuple[np.ndarray, list[Path], Path]:
    """A CT series of the phantom organs and an RTSTRUCT naming label value v `names[v]`, nested as exports are."""
    grid = phantom_grid(direction, 2.0, 3.0)
    labels = phantom_organs(grid) if labels is None else labels
    files = write_ct_series(ct_of(phantom_organs(grid), grid), root / patient_id / "study" / "series 1",
                            Patient(patient_id=patient_id, patient_position="FFS" if direction == FEET_FIRST else "HFS"))
    structures = [Structure(value, name) for value, name in names.items()]
    rs = write_rtstruct(labels, files, structures, root / patient_id / "RS" / "structures", "clinic contours")
    return labels, files, rs


def import_cli(src: Path, out: Path, capsys, *extra: str) -> tuple[int, str, str]:
    code = main(["import-dicom-rt", str(src), str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float(np.sum(a & b)) / max(float(a.sum() + b.sum()), 1.0)


# ---------------------------------------------------------------------------------- new user path


def test_sample_clinic_folder_imports_onto_the_ct_grid(tmp_path, capsys, tiny_dataset):
    clinic, out = tmp_path / "clinic", tmp_path / "imported"
    assert main(["sample-data", "--task", "prostate", "--format", "dicom", "--cases", "2", "--out", str(clinic)]) == 0

    code, printed, _ = import_cli(clinic, out, capsys, "--task", "prostate")

    assert code == 0, printed
    assert "PHANTOM002: 50 slices; prostate <- PROSTATE, bladder <- Bladder, rectum <- RECTUM, femoral_head_left <- " \
           "Lt Femoral Head, femoral_head_right <- Femur_Head_R" in printed
    report = json.loads((out / "import_report.json").read_text())
    assert report["skipped_files"] == 2 and not report["failed"]  # the export logs
    entries = json.loads((out / "dataset.json").read_text())["training"]
    assert [e["contoured"] for e in entries] == [list(LABELS.values())] * 2
    for index, entry in enumerate(entries):
        ct, truth, _ = clinic_case(index)
        series = next(p.parent for p in (clinic / f"PHANTOM{index + 1:03d}").rglob("IM00001"))
        independent = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
        first = min((pydicom.dcmread(p, stop_before_pixels=True) for p in series.iterdir()),
                    key=lambda ds: float(ds.ImagePositionPatient[2]) * (1 if index % 2 == 0 else -1))
        labels, grid = read_label(out / entry["label"])
        image, image_grid = read_image(out / entry["image"], dtype=None)
        assert grid.matches(Grid.of(independent)) and image_grid.matches(Grid.of(independent))
        assert grid.matches(Grid.of(ct))
        np.testing.assert_allclose(grid.origin, [float(v) for v in first.ImagePositionPatient], atol=1e-3)
        np.testing.assert_array_equal(image[0], sitk.GetArrayFromImage(independent).transpose(2, 1, 0))
        for value in LABELS:
            assert dice(labels == value, truth == value) >= 0.95

    assert main(["check-dataset", str(out), "--task", "prostate", "--out", str(tmp_path / "fp.json")]) == 0
    _, tiny_task = tiny_dataset  # the prostate organs with a tiny network: training reads the import
    assert main(["train", "--task", str(tiny_task), "--data", str(out), "--epochs", "1", "--folds", "2",
                 "--out", str(tmp_path / "run"), "--device", "cpu"]) == 0
    assert (tmp_path / "run" / "best.pt").is_file()


# ------------------------------------------------------------------------------- names and overlaps


def test_partial_labels_unmatched_names_and_the_smaller_organ_keeping_an_overlap(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    labels, files, rs = write_patient(src, "P1", {2: "BLADDER", 3: "PTV_78"})
    small = np.zeros_like(labels)
    bladder = np.argwhere(labels == 2)
    centre = np.round(bladder.mean(0)).astype(int)
    small[tuple(slice(c - 2, c + 3) for c in centre)] = 1  # a 5 x 5 x 5 box in the bladder
    second = write_rtstruct(small, files, [Structure(1, "Lt Prostate Gland")], tmp_path / "rs2.dcm", "x")
    merge_structure(rs, second)  # two structures overlapping in one structure set

    code, printed, _ = import_cli(src, out, capsys)

    assert code == 0, printed
    case = json.loads((out / "import_report.json").read_text())["cases"][0]
    assert case["unmatched"] == ["PTV_78", "Lt Prostate Gland"]  # a side on a midline organ is not a prostate
    merge_structure(rs, write_rtstruct(small, files, [Structure(1, "Prostate")], tmp_path / "rs3.dcm", "x"))
    code, printed, _ = import_cli(src, tmp_path / "out2", capsys)
    case = json.loads((tmp_path / "out2" / "import_report.json").read_text())["cases"][0]
    written, _ = read_label(tmp_path / "out2" / "labelsTr" / "P1.nii.gz")
    assert code == 0
    assert case["contoured"] == ["prostate", "bladder"]
    assert case["overlaps"] == [{"organs": ["bladder", "prostate"], "voxels": 125, "ml": 1.5, "kept_by": "prostate"}]
    assert "overlap bladder/prostate 125 voxels (kept by prostate)" in printed
    assert np.sum(written == 1) == 125 and np.sum(written == 2) == np.sum(labels == 2) - 125
    entry = json.loads((tmp_path / "out2" / "dataset.json").read_text())["training"][0]
    assert entry == {"image": "./imagesTr/P1_0000.nii.gz", "label": "./labelsTr/P1.nii.gz",
                     "contoured": ["prostate", "bladder"]}
    assert main(["check-dataset", str(tmp_path / "out2"), "--out", str(tmp_path / "fp.json")]) == 0


def merge_structure(target: Path, source: Path) -> None:
    """Append the structures of `source` to the RTSTRUCT `target` (renumbered), as a clinic's may overlap."""
    ds, extra = pydicom.dcmread(target), pydicom.dcmread(source)
    offset = max(int(r.ROINumber) for r in ds.StructureSetROISequence)
    for roi, contour, observation in zip(extra.StructureSetROISequence, extra.ROIContourSequence,
                                         extra.RTROIObservationsSequence):
        roi.ROINumber = contour.ReferencedROINumber = observation.ReferencedROINumber = int(roi.ROINumber) + offset
        observation.ObservationNumber = roi.ROINumber
        ds.StructureSetROISequence.append(roi)
        ds.ROIContourSequence.append(contour)
        ds.RTROIObservationsSequence.append(observation)
    ds.save_as(target)


@pytest.mark.parametrize("masks, expected, overlaps", [
    pytest.param({"bladder": [1, 1, 1, 1, 0], "prostate": [0, 0, 1, 1, 0]}, [2, 2, 1, 1, 0],
                 [(["bladder", "prostate"], 2, "prostate")], id="small-inside-big"),
    pytest.param({"bladder": [0, 1, 1, 0, 0], "prostate": [1, 1, 0, 0, 0]}, [1, 1, 2, 0, 0],
                 [(["bladder", "prostate"], 1, "prostate")], id="equal-size-first-in-task-keeps"),
    pytest.param({"rectum": [0, 0, 0, 1, 1], "bladder": [1, 0, 0, 0, 0]}, [2, 0, 0, 3, 3], [], id="apart"),
])
def test_paint_gives_shared_voxels_to_the_smaller_organ(masks, expected, overlaps):
    order = [label.name for label in PROSTATE.labels]
    ids = {label.name: label.id for label in PROSTATE.labels}
    arrays = {organ: np.array(m, bool).reshape(5, 1, 1) for organ, m in masks.items()}
    labels, found = paint(arrays, order, 0.5, ids)
    assert labels.ravel().tolist() == expected
    assert [(o["organs"], o["voxels"], o["kept_by"]) for o in found] == overlaps


def test_mapping_file_names_what_the_rules_cannot(tmp_path, capsys):
    lone = tmp_path / "lone"
    _, _, rs = write_patient(lone, "P0", {1: "Blad"})
    code, _, err = import_cli(lone, tmp_path / "none", capsys)
    assert code == 2 and not (tmp_path / "none").exists()
    assert err.strip() == (f"error: {lone}: no case could be imported (1 failed; first: {rs}: no structure matches "
                           "an organ of task 'prostate' (structures: Blad); give a --mapping file)")
    src = tmp_path / "src"
    write_patient(src, "P1", {1: "Blad", 2: "Rectum_old", 3: "Rectum"})
    assert import_cli(src, tmp_path / "rules", capsys)[0] == 0
    case = json.loads((tmp_path / "rules" / "import_report.json").read_text())["cases"][0]
    assert case["contoured"] == ["rectum"] and case["unmatched"] == ["Blad", "Rectum_old"]
    mapping = tmp_path / "names.yaml"
    mapping.write_text("Blad: bladder\nrectum old: null\n")

    code, printed, _ = import_cli(src, tmp_path / "out", capsys, "--mapping", str(mapping))

    assert code == 0, printed
    case = json.loads((tmp_path / "out" / "import_report.json").read_text())["cases"][0]
    assert case["contoured"] == ["bladder", "rectum"]
    assert [(s["name"], s["organ"], s["how"]) for s in case["structures"]] == [
        ("Blad", "bladder", "mapping file"), ("Rectum_old", None, "ignored by the mapping file"),
        ("Rectum", "rectum", "TG-263 name")]


# --------------------------------------------------------------------------- bad cases and pairing


def test_a_bad_case_is_reported_and_the_others_imported(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    write_patient(src, "GOOD", {1: "Prostate"})
    _, files, _ = write_patient(src, "GAP", {1: "Prostate"}, direction=FEET_FIRST)
    sorted(files)[5].unlink()  # a slice lost on the way

    code, printed, _ = import_cli(src, out, capsys)

    assert code == 1
    report = json.loads((out / "import_report.json").read_text())
    assert [c["case"] for c in report["cases"]] == ["GOOD"]
    assert len(report["failed"]) == 1 and report["failed"][0]["error"].endswith("a slice is missing")
    assert "skipped GAP: " in printed and "a slice is missing" in printed
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["GOOD.nii.gz"]


def test_structure_sets_are_paired_by_series_else_by_frame(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    _, _, by_frame = write_patient(src, "A", {1: "Prostate"})
    ds = pydicom.dcmread(by_frame)
    del ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence  # names its frame only
    ds.save_as(by_frame)
    _, _, lost = write_patient(src, "B", {2: "Bladder"})
    ds = pydicom.dcmread(lost)
    ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = "1.2.3.4"
    ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]\
        .SeriesInstanceUID = "1.2.3.5"
    ds.save_as(lost)
    _, _, first = write_patient(src, "C", {1: "Prostate"})
    (src / "C" / "RS2").mkdir()
    (src / "C" / "RS2" / "copy").write_bytes(first.read_bytes())
    (src / "README.txt").write_text("not DICOM")

    code, printed, _ = import_cli(src, out, capsys)

    report = json.loads((out / "import_report.json").read_text())
    assert code == 1
    assert [c["case"] for c in report["cases"]] == ["A"]
    errors = [f["error"] for f in report["failed"]]  # structure sets without their CT first, then cases
    assert errors == [f"{lost}: refers to no CT series found under the source folder",
                      (f"{src / 'C' / 'study' / 'series 1'}: 2 RTSTRUCTs refer to this CT series "
                       f"({first}, {src / 'C' / 'RS2' / 'copy'}); keep one in the source folder")]
    assert f"skipped: {lost}: refers to no CT series" in printed
    assert report["ct_series_without_rtstruct"][0]["patient_id"] == "B"
    assert report["skipped_files"] == 1


def test_output_must_be_new_and_nothing_is_written_without_a_case(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    write_patient(src, "A", {1: "Prostate"})
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = import_cli(src, out, capsys)
    assert code == 2 and err.strip() == f"error: {out}: already exists and is not an empty folder; choose a new " \
                                        "output folder"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    code, _, err = import_cli(tmp_path / "src" / "A" / "RS", tmp_path / "new", capsys)
    assert code == 2 and "found 0 CT series and no RTSTRUCT that refers to one" in err
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new*"))
