"""DICOM-SEG out (and back, to check it): organ masks as a highdicom Segmentation of the source CT.

A BINARY segmentation, one segment per organ present: the format every DICOM-SEG viewer and archive
reads (the newer LABELMAP type is not yet widely supported). Frame k of the mask is the CT slice at
position k along the normal, matched by position and referenced by its SOPInstanceUID, never by the
order of the file list; frames where an organ is absent are left out, as the standard allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.dicom import require
from medseg.dicom.reference import Structure, ordered_slices, organs_on_series
from medseg.errors import InputError
from medseg.io import Grid, atomic_path


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medseg")
    except PackageNotFoundError:
        return "unknown"


def _descriptions(hd, present: Sequence[Structure], algorithm: str) -> list:
    from pydicom.sr.codedict import codes

    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm[:64], family=codes.cid7162.ArtificialIntelligence, version=_version())
    descriptions = []
    for number, structure in enumerate(present, start=1):  # segment numbers must run 1..N
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=structure.name[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure, segmented_property_type=codes.SCT.Organ,
            algorithm_type="AUTOMATIC", algorithm_identification=identification,
            tracking_uid=hd.UID(), tracking_id=structure.name[:64],
            display_color=hd.color.CIELabColor.from_rgb(*(int(c) for c in structure.color)))
        description.SegmentDescription = (structure.label or structure.name)[:64]  # the task's organ name
        descriptions.append(description)
    return descriptions


def write_dicom_seg(labels: np.ndarray, ct_files: Sequence[Path], structures: Sequence[Structure], path: str | Path,
                    series_description: str, algorithm: str = "medseg", grid: Grid | None = None) -> Path:
    """Write the organs of a label map as a DICOM-SEG referring to its CT series.

    Args:
        labels: (X, Y, Z) label map on the CT series' grid, voxel order as `medseg.io.read_image` gives it.
        ct_files: every file of that series, any order (slices are matched by position).
        structures: organs to write (number = label value); organs absent from `labels` are left out.
        path: the .dcm file to write (atomically).
        series_description: shown by viewers; name the model that drew the masks.
        algorithm: the algorithm's name in each segment's AlgorithmIdentificationSequence.
        grid: the mask's grid, if known: the slices must lie on it (catches a mask of another series).

    Raises:
        InputError: the mask does not fit the series, or no organ is present (nothing to write).
    """
    hd = require("highdicom", "writing a DICOM-SEG")
    slices, present, _ = organs_on_series(labels, ct_files, structures, grid, path, "DICOM-SEG")
    lookup = np.zeros(256, np.uint8)  # label value -> segment number; organs not written -> 0
    lookup[[s.number for s in present]] = np.arange(1, len(present) + 1)
    # (Z, rows = j, columns = i): frame k is slice k; contiguous, as highdicom reads it frame by frame
    frames = np.ascontiguousarray(lookup[labels].transpose(2, 1, 0))
    seg = hd.seg.Segmentation(
        source_images=[s.dataset for s in slices], pixel_array=frames, segmentation_type="BINARY",
        segment_descriptions=_descriptions(hd, present, algorithm), series_instance_uid=hd.UID(),
        series_number=902, sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medseg",
        manufacturer_model_name=series_description[:64], software_versions=_version(), device_serial_number="none",
        series_description=series_description[:64], content_label="MEDSEG", content_description=series_description[:64])
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return Path(path)


def read_dicom_seg(path: str | Path, ct_files: Sequence[Path]) -> dict[str, np.ndarray]:
    """The segments of a DICOM-SEG as masks on its CT series' grid.

    Returns:
        Segment label -> (X, Y, Z) bool mask, slice k being the CT slice at position k (as
        `medseg.io.read_image` orders them); frames the file leaves out are empty.
    """
    hd = require("highdicom", "reading a DICOM-SEG")
    try:
        seg = hd.seg.segread(path)
    except (OSError, ValueError, AttributeError) as error:
        raise InputError(f"{path}: not a readable DICOM-SEG ({error})") from None
    slices = ordered_slices(list(ct_files))
    uids = [str(s.dataset.SOPInstanceUID) for s in slices]
    masks = {}
    for number in seg.segment_numbers:
        pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[number], assert_missing_frames_are_empty=True)
        masks[str(seg.get_segment_description(number).SegmentLabel)] = pixels[..., 0].transpose(2, 1, 0) > 0
    return masks
