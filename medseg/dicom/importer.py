"""A clinic's DICOM-RT export (CT series + RTSTRUCT per patient) as an MSD training dataset.

`import_dicom_rt(src, out, task)` walks `src` (any nesting, any file names: every file's header is read,
files that are not DICOM are skipped), groups the CT slices by series and pairs each RTSTRUCT with the
CT series it refers to (its RTReferencedSeries UID, else its frame of reference when one CT series has
it). One case per CT series with one RTSTRUCT: the CT is read with every check of
`medseg.dicom.series`, the structures are rasterised on the CT's exact grid
(`medseg.dicom.rtstruct.read_rtstruct`) and matched to the task's organs by name
(`medseg.dicom.names`). The organs found are the case's `contoured` list, so an organ a clinic did
not draw is unlabelled in that case, not background.

Overlaps: where two matched structures overlap, the smaller structure keeps the shared voxels (a
small organ drawn inside or against a big one survives whole; the big one loses a sliver); every
overlap is counted in the report.

A case that cannot be imported (a series trap, an RTSTRUCT without its CT or with two, no organ
matched) is reported and skipped; the others are written and the command exits 1. If none can be
imported, nothing is written. The dataset is built in a temporary folder beside `out` and renamed into
place at the end, so `out` is either complete or absent; an existing non-empty `out` is refused.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.dicom import require
from medseg.errors import InputError
from medseg.io import atomic_folder

REPORT_NAME = "import_report.json"
_TAGS = ("Modality", "PatientID", "SeriesInstanceUID", "FrameOfReferenceUID", "SeriesDescription")


@dataclass
class CtSeries:
    """The slices of one CT series found under the source folder."""

    uid: str
    patient: str
    frame: str
    description: str
    files: list[Path] = field(default_factory=list)
    structure_sets: list[StructureSet] = field(default_factory=list)


@dataclass(frozen=True)
class StructureSet:
    """One RTSTRUCT file: what it refers to and the names of its structures."""

    path: Path
    patient: str
    series: tuple[str, ...]  # referenced CT series UIDs
    frames: tuple[str, ...]  # referenced frames of reference
    names: tuple[str, ...]  # structure (ROI) names, in the file's order


@dataclass
class Found:
    """What the walk through the source folder found."""

    series: dict[str, CtSeries] = field(default_factory=dict)
    unpaired: list[tuple[str, str]] = field(default_factory=list)  # (RTSTRUCT, why it has no CT)
    skipped_files: int = 0  # not DICOM, or DICOM objects other than CT slices and RTSTRUCTs


def _text(ds, key: str) -> str:
    return str(ds.get(key, "") or "").strip()


def _structure_set(ds, path: Path) -> StructureSet:
    series, frames = [], []
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        frames.append(_text(frame, "FrameOfReferenceUID"))
        for study in frame.get("RTReferencedStudySequence", []):
            series += [_text(s, "SeriesInstanceUID") for s in study.get("RTReferencedSeriesSequence", [])]
    names = tuple(_text(roi, "ROIName") for roi in ds.get("StructureSetROISequence", []))
    return StructureSet(path, _text(ds, "PatientID"), tuple(series), tuple(f for f in frames if f), names)


def scan_folder(src: Path, modality: str = "CT") -> Found:
    """Every DICOM file under `src` by its header: image series of `modality` and RTSTRUCTs, paired."""
    pydicom = require("pydicom", "importing DICOM-RT")
    found, structure_sets = Found(), []
    for path in sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            kind = _text(ds, "Modality")
        except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError):
            found.skipped_files += 1
            continue
        if kind == "RTSTRUCT":
            structure_sets.append(_structure_set(ds, path))
        elif kind == modality and "ImagePositionPatient" in ds:
            uid = _text(ds, "SeriesInstanceUID")
            if uid not in found.series:
                found.series[uid] = CtSeries(uid, _text(ds, "PatientID"), _text(ds, "FrameOfReferenceUID"),
                                             _text(ds, "SeriesDescription"))
            found.series[uid].files.append(path)
        else:
            found.skipped_files += 1
    for structure_set in structure_sets:
        _pair(structure_set, found)
    return found


def _pair(structure_set: StructureSet, found: Found) -> None:
    """Attach an RTSTRUCT to its CT series: by series UID, else by a frame of reference only one series has."""
    by_series = [found.series[uid] for uid in structure_set.series if uid in found.series]
    if by_series:
        by_series[0].structure_sets.append(structure_set)
        return
    by_frame = [s for s in found.series.values() if s.frame and s.frame in structure_set.frames]
    if len(by_frame) == 1:
        by_frame[0].structure_sets.append(structure_set)
    elif not by_frame:
        found.unpaired.append((str(structure_set.path), "refers to no CT series found under the source folder"))
    else:
        uids = ", ".join(s.uid for s in by_frame)
        why = f"its frame of reference is shared by {len(by_frame)} CT series ({uids}) and it names none of them"
        found.unpaired.append((str(structure_set.path), why))


def case_names(series: list[CtSeries]) -> dict[str, str]:
    """Series UID -> case name: the patient ID in file-safe letters, numbered when a patient has several."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for s in sorted(series, key=lambda s: (s.patient, s.uid)):
        base = re.sub(r"[^A-Za-z0-9-]+", "_", s.patient).strip("_") or "case"
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}_{n}"
        taken.add(name)
        names[s.uid] = name
    return names


def paint(masks: Mapping[str, np.ndarray], order: list[str], voxel_ml: float,
          label_ids: Mapping[str, int]) -> tuple[np.ndarray, list[dict]]:
    """A label map of the organs' masks, the smaller organ keeping voxels two organs share.

    Args:
        masks: organ -> (X, Y, Z) bool mask, all on one grid.
        order: the organs in task order: of two organs the same size, the first keeps what they share.
        label_ids: organ -> label value.

    Returns:
        The uint8 label map and one entry per overlapping pair: organs, voxels, mL and which kept them.
    """
    shape = next(iter(masks.values())).shape
    labels = np.zeros(shape, np.uint8)
    organ_of = {label_ids[o]: o for o in masks}
    sizes = {o: int(np.count_nonzero(masks[o])) for o in masks}
    overlaps = []
    # largest first, smaller ones paint over it; of two the same size, the one first in the task keeps the overlap
    for organ in sorted(masks, key=lambda o: (-sizes[o], -order.index(o))):
        under = np.bincount(labels[masks[organ]], minlength=256)
        for value in np.flatnonzero(under[1:]) + 1:
            overlaps.append({"organs": [organ_of[int(value)], organ], "voxels": int(under[value]),
                             "ml": round(float(under[value]) * voxel_ml, 3), "kept_by": organ})
        labels[masks[organ]] = label_ids[organ]
    return labels, overlaps


def _masks_of(structure_set: StructureSet, grid, files: list[Path], task, mapping) -> tuple[dict, dict]:
    """(organ -> mask, case report) from one RTSTRUCT on the CT grid."""
    from medseg.dicom.names import AMBIGUOUS, UNMATCHED, match_structures, organs_found
    from medseg.dicom.rtstruct import read_rtstruct

    matches = match_structures(structure_set.names, task.labels, mapping)
    drawn = read_rtstruct(structure_set.path, grid, files)
    masks, empty = {}, []
    for organ, structures in organs_found(matches).items():
        parts = [drawn[s] for s in structures if s in drawn and drawn[s].any()]
        if parts:
            masks[organ] = np.logical_or.reduce(parts)
        else:
            empty.append(organ)
    report = {
        "rtstruct": str(structure_set.path),
        "structures": [{"name": m.structure, "organ": m.organ, "how": m.how} for m in matches],
        "unmatched": [m.structure for m in matches if m.how == UNMATCHED],
        "ambiguous": [m.structure for m in matches if m.how == AMBIGUOUS],
        "empty": empty,  # matched, but no contour inside the CT: left out of `contoured`
    }
    return masks, report


def import_case(series: CtSeries, name: str, task, mapping, folder: Path) -> dict:
    """Read, match, paint and write one case into the dataset `folder`; returns its report entry."""
    import SimpleITK as sitk

    from medseg.dicom.series import read_series
    from medseg.io import Grid, write_label_map, write_sitk

    where = os.path.commonpath([str(p.parent) for p in series.files])
    if len(series.structure_sets) > 1:
        paths = ", ".join(str(s.path) for s in series.structure_sets)
        raise InputError(f"{where}: {len(series.structure_sets)} RTSTRUCTs refer to this CT series ({paths}); "
                         "keep one in the source folder")
    image = read_series(series.files, where)
    grid = Grid.of(image)
    masks, report = _masks_of(series.structure_sets[0], grid, series.files, task, mapping)
    if not masks:
        raise InputError(f"{series.structure_sets[0].path}: no structure matches an organ of task '{task.name}' "
                         f"(structures: {', '.join(series.structure_sets[0].names) or 'none'}); "
                         "give a --mapping file")
    order = [label.name for label in task.labels]
    labels, overlaps = paint(masks, order, grid.voxel_volume_ml, {lab.name: lab.id for lab in task.labels})
    write_sitk(image, folder / "imagesTr" / f"{name}_0000.nii.gz")
    write_label_map(labels, grid, folder / "labelsTr" / f"{name}.nii.gz")
    counts = np.bincount(labels.ravel(), minlength=256)
    contoured = [organ for organ in order if organ in masks]
    return {"case": name, "patient_id": series.patient, "ct_series": series.uid, "ct_folder": where,
            "slices": image.GetSize()[2], "pixel_type": sitk.GetPixelIDValueAsString(image.GetPixelID()),
            "contoured": contoured, "overlaps": overlaps, **report,
            "volume_ml": {o: round(float(counts[lab.id]) * grid.voxel_volume_ml, 3)
                          for lab in task.labels if (o := lab.name) in contoured}}


def _dataset_json(task, src: Path, cases: list[dict]) -> dict:
    return {
        "name": task.name,
        "description": f"Imported from DICOM-RT ({src}) by medseg import-dicom-rt; organs a case did not "
                       "contour are unlabelled there, not absent: see 'contoured'",
        "tensorImageSize": "3D",
        "modality": {str(i): c for i, c in enumerate(task.channels)},
        "labels": {"0": "background", **{str(lab.id): lab.name for lab in task.labels}},
        "numTraining": len(cases),
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{c['case']}_0000.nii.gz", "label": f"./labelsTr/{c['case']}.nii.gz",
                      "contoured": c["contoured"]} for c in cases],
        "test": [],
    }


def import_dicom_rt(src: str | Path, out: str | Path, task, mapping: Mapping[str, str | None] | None = None,
                    progress: Callable[[str], None] = lambda line: None) -> dict:
    """Import a DICOM-RT export as an MSD dataset in `out` (see the module); returns the report.

    Args:
        src: folder holding the patients' CT series and RTSTRUCTs, any nesting and file names.
        out: new dataset folder (absent or empty).
        task: the task whose organs the structures are matched to (`medseg.config.Task`).
        mapping: structure name -> organ name or None (ignore), applied before the name rules.
        progress: called with one line per case as it is imported or skipped.

    Raises:
        InputError: no source folder, `out` not new, or not one case could be imported (nothing written).
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise InputError(f"{src}: no such folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # before minutes of reading
        raise InputError(f"{out}: already exists and is not an empty folder; choose a new output folder")
    found = scan_folder(src, task.modality)
    failed = [{"source": path, "error": f"{path}: {why}"} for path, why in found.unpaired]
    for failure in failed:
        progress(f"skipped: {failure['error']}")
    with_structures = [s for s in found.series.values() if s.structure_sets]
    unused = [{"ct_series": s.uid, "patient_id": s.patient, "slices": len(s.files)}
              for s in found.series.values() if not s.structure_sets]
    if not with_structures:
        raise InputError(f"{src}: found {len(found.series)} {task.modality} series and no RTSTRUCT that refers to "
                         f"one ({len(failed)} RTSTRUCT(s) without their CT); nothing to import")
    names = case_names(with_structures)
    with atomic_folder(out) as building:
        cases = _import_all(with_structures, names, task, mapping, building, failed, progress)
        if not cases:
            raise InputError(f"{src}: no case could be imported ({len(failed)} failed; first: {failed[0]['error']})")
        report = {"source": str(src), "task": task.name, "cases": cases, "failed": failed,
                  "ct_series_without_rtstruct": unused, "skipped_files": found.skipped_files}
        (building / "dataset.json").write_text(json.dumps(_dataset_json(task, src, cases), indent=2) + "\n")
        (building / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _import_all(series: list[CtSeries], names: dict[str, str], task, mapping, folder: Path, failed: list[dict],
                progress: Callable[[str], None]) -> list[dict]:
    cases = []
    for s in sorted(series, key=lambda s: names[s.uid]):
        try:
            case = import_case(s, names[s.uid], task, mapping, folder)
        except InputError as error:
            message = str(error).strip().splitlines()[0]
            failed.append({"source": os.path.commonpath([str(p.parent) for p in s.files]), "error": message})
            progress(f"skipped {names[s.uid]}: {message}")
            continue
        cases.append(case)
        progress(describe_case(case))
    return cases


def describe_case(case: dict) -> str:
    """One line for the terminal: organs found, structures not used, overlaps."""
    matched = ", ".join(f"{s['organ']} <- {s['name']}" for s in case["structures"] if s["organ"])
    line = f"{case['case']}: {case['slices']} slices; {matched}"
    unused = [s["name"] for s in case["structures"] if not s["organ"]]
    if unused:
        line += f"; not used: {', '.join(unused)}"
    if case["empty"]:
        line += f"; empty: {', '.join(case['empty'])}"
    for overlap in case["overlaps"]:
        line += f"; overlap {'/'.join(overlap['organs'])} {overlap['voxels']} voxels (kept by {overlap['kept_by']})"
    return line
