"""DICOM outputs of `medseg predict`: a DICOM-SEG and an RTSTRUCT beside each case's NIfTI mask.

Both refer to the CT series the case was read from, so they need that series as input: a NIfTI file
has no UIDs to refer to. That is checked for every input before the model loads, so a wrong input
stops the run before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.dicom import require
from medseg.dicom.reference import structures_of
from medseg.errors import InputError
from medseg.io import Grid


@dataclass(frozen=True)
class DicomOutputs:
    seg: bool = False  # <case>_seg.dcm: DICOM-SEG, one binary segment per organ found (highdicom)
    rtstruct: bool = False  # <case>_rtstruct.dcm: closed planar contours on voxel edges

    @property
    def wanted(self) -> bool:
        return self.seg or self.rtstruct


def check_dicom_inputs(scans: Sequence[Path], outputs: DicomOutputs) -> None:
    """Refuse, before any work, inputs that are not DICOM series and a missing `dicom` extra."""
    if not outputs.wanted:
        return
    for scan in scans:
        if not Path(scan).is_dir():
            raise InputError(f"{scan}: DICOM-SEG/RTSTRUCT output needs a DICOM CT series as input (a folder)")
    require("pydicom", "DICOM-SEG/RTSTRUCT output")
    if outputs.seg:
        require("highdicom", "DICOM-SEG output")
    if outputs.rtstruct:
        require("skimage.measure", "RTSTRUCT output")


def series_description(task, model: str | Path) -> str:
    """What a planning system shows for the series: which task and which trained model drew it."""
    return f"medseg {task.name} model {Path(model).name}"[:64]


def write_dicom_outputs(labels: np.ndarray, grid: Grid, ct_files: Sequence[Path], task, model: str | Path,
                        out: Path, case: str, outputs: DicomOutputs) -> list[Path]:
    """Write the requested DICOM objects for one case; returns their paths.

    Args:
        labels: (X, Y, Z) predicted label map on `grid`, the grid the CT series was read on.
        ct_files: the files of that series (e.g. `medseg.dicom.series.series_files`).
        task: the model's task: organ numbers, TG-263 names and colours.
        model: the model folder, named in the series description.

    Returns:
        The files written; none when no organ was segmented (there is nothing to refer to).
    """
    from medseg.dicom.rtstruct import write_rtstruct
    from medseg.dicom.seg import write_dicom_seg

    structures = structures_of(task)
    if not any(np.any(labels == s.number) for s in structures):
        return []
    description = series_description(task, model)
    written = []
    if outputs.seg:
        written.append(write_dicom_seg(labels, ct_files, structures, Path(out) / f"{case}_seg.dcm", description,
                                       algorithm=description, grid=grid))
    if outputs.rtstruct:
        written.append(write_rtstruct(labels, ct_files, structures, Path(out) / f"{case}_rtstruct.dcm", description,
                                      grid=grid))
    return written
