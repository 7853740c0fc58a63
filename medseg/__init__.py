"""medseg: 3D medical image segmentation with TorchIO pipelines and MONAI networks.

The Python API mirrors the CLI; heavy modules load on first use so `import medseg` stays light.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "Predictor": "medseg.infer.predictor",
    "load_task": "medseg.config",
    "read_image": "medseg.io",
    "read_label": "medseg.io",
    "write_label_map": "medseg.io",
    "Grid": "medseg.io",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medseg' has no attribute {name!r}")
