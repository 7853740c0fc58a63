"""DICOM in and out: CT series, RTSTRUCT and DICOM-SEG, for radiotherapy planning systems.

Reading a CT series needs only SimpleITK (a core dependency); writing DICOM objects and importing
RTSTRUCTs need the `dicom` extra (`pip install "medseg[dicom]"`: pydicom, highdicom, scikit-image),
imported lazily through `require` so that everything else works without it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from medseg.errors import InputError

EXTRA_HINT = 'pip install "medseg[dicom]"'


def require(module: str, what: str) -> ModuleType:
    """Import an optional DICOM library, or say in one line which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InputError(f"{what} needs the optional package '{module}': {EXTRA_HINT}") from None
