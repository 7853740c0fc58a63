"""The sample phantoms as a clinic's DICOM-RT export: what `medseg import-dicom-rt` is for.

Each case becomes a patient folder with a CT series and an RTSTRUCT, laid out the way exports arrive:
nested folders named by study and series, slice files named by number in no slice order, the RTSTRUCT
in a folder of its own, and an export log that is not DICOM. The CT is axial, as a planning CT is:
even cases head first (HFS, voxel order LPS), odd cases feet first (FFS, RPI), the same voxels as the
NIfTI sample case of that index, turned. Structures carry the spellings clinics use (`BLADDER`,
`Lt Femoral Head`, `femoral head rt`), not the task's organ names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg.data.phantom import LABELS, sample_case
from medseg.errors import InputError
from medseg.io import atomic_folder, from_array, to_array, write_text

CLINIC_NAMES = {  # organ -> the structure name case i uses: CLINIC_NAMES[organ][i % 3]
    "prostate": ("Prostate", "PROSTATE", "prostate"),
    "bladder": ("BLADDER", "Bladder", "Urinary Bladder"),
    "rectum": ("Rectum", "RECTUM", "rectum"),
    "femoral_head_left": ("Femur_Head_L", "Lt Femoral Head", "FEMORAL HEAD LEFT"),
    "femoral_head_right": ("femoral head rt", "Femur_Head_R", "R Femoral Head"),
}
COLORS = {1: (230, 25, 75), 2: (255, 225, 25), 3: (245, 130, 48), 4: (60, 180, 75), 5: (0, 130, 200)}


def clinic_case(index: int, seed: int = 0) -> tuple[sitk.Image, np.ndarray, str]:
    """Sample case `index` turned to an axial planning CT: (image, labels (X, Y, Z) on it, patient position)."""
    image, labels, grid = sample_case(index, seed)
    code, position = ("LPS", "HFS") if index % 2 == 0 else ("RPI", "FFS")
    ct = sitk.DICOMOrient(from_array(image, grid), code)
    turned = sitk.DICOMOrient(from_array(labels, grid), code)
    return ct, to_array(turned), position


def _write_patient(folder: Path, index: int, seed: int) -> None:
    from medseg.dicom.ct import Patient, write_ct_series
    from medseg.dicom.reference import Structure
    from medseg.dicom.rtstruct import write_rtstruct

    ct, labels, position = clinic_case(index, seed)
    patient = Patient(patient_id=f"PHANTOM{index + 1:03d}", patient_name=f"Phantom^{index + 1:03d}",
                      study_description="Pelvis planning CT", series_description="Pelvis 2.0 CT",
                      patient_position=position)
    study = folder / f"{patient.patient_id}" / "20240312_RT_PLANNING"
    series = study / "CT_2"
    files = write_ct_series(ct, series, patient)
    order = np.random.default_rng([seed, index, 1]).permutation(len(files))
    renamed = []
    for path, number in zip(files, order):  # numbered as an archive numbers them, not by slice
        renamed.append(path.rename(series / f"IM{number + 1:05d}"))
    structures = [Structure(value, CLINIC_NAMES[organ][index % 3], COLORS[value], organ)
                  for value, organ in LABELS.items()]
    write_rtstruct(labels, renamed, structures, study / "RTSTRUCT_1" / f"RS{index + 1:03d}.dcm",
                   series_description="Physician contours")
    write_text("exported by a treatment planning system (not DICOM)\n", study / "export.log")


def write_clinic_folder(out: str | Path, task: str = "prostate", n_cases: int = 4, seed: int = 0) -> Path:
    """Write `n_cases` patient folders of CT + RTSTRUCT into the new folder `out` (atomically); returns it."""
    if task != "prostate":
        raise InputError(f"no phantom for task '{task}' (available: prostate)")
    if n_cases < 1 or seed < 0:
        raise InputError(f"need at least 1 case and a seed of 0 or more, got {n_cases} and {seed}")
    with atomic_folder(out) as folder:
        for index in range(n_cases):
            _write_patient(folder, index, seed)
    return Path(out)
