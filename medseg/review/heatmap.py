"""The review page's uncertainty layer: one axial slice with the uncertainty as a heat map over the scan.

`uncertainty_picture` is a pure function from a slice, its labels and its uncertainty to an RGB array;
`write_uncertainty_picture` chooses the slice and writes `<case>_uncertainty.png`, which the review
page shows in place of the thumbnail when its "show uncertainty" switch is on. The slice is the axial
one holding the most uncertainty inside the organs' box (plus the overlays' margin), shown in
radiological orientation like the overlays, with the predicted organs drawn as there; the heat runs
from transparent (certain) through yellow to red (normalised entropy HEAT_FULL and above).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from medseg.config import Task
from medseg.review.render import Color, render_slice

HEAT_FULL = 0.4  # normalised entropy drawn fully red: two of six classes equally likely is 0.39
HEAT_ALPHA = 0.8  # opacity of the heat at HEAT_FULL
PICTURE_SIZE = (720, 600)  # px, (width, height) at most


def uncertainty_picture(image2d: np.ndarray, labels2d: np.ndarray, uncertainty2d: np.ndarray,
                        colors: Mapping[int, Color], window: tuple[float, float], pixel_spacing: tuple[float, float],
                        pixel_mm: float | None = None) -> np.ndarray:
    """One slice as `render_slice` draws it, with the uncertainty laid over it as heat.

    Args:
        image2d, labels2d, uncertainty2d: (H0, W0) arrays of one slice; uncertainty in [0, 1].
    Returns:
        (H, W, 3) uint8, the size `render_slice` gives.
    """
    from PIL import Image

    rgb = render_slice(image2d, labels2d, colors, window, pixel_spacing, pixel_mm=pixel_mm).astype(np.float32)
    height, width = rgb.shape[:2]
    heat = np.asarray(Image.fromarray(np.ascontiguousarray(uncertainty2d, np.float32))  # mode "F"
                      .resize((width, height), Image.BILINEAR))
    strength = np.clip(heat / HEAT_FULL, 0.0, 1.0)[..., None]
    colour = np.concatenate([np.full_like(strength, 255.0), 255.0 * (1 - strength), np.zeros_like(strength)], -1)
    alpha = HEAT_ALPHA * strength
    return np.round(rgb * (1 - alpha) + colour * alpha).astype(np.uint8)


def _window(task: Task, volume: np.ndarray) -> tuple[float, float]:
    if task.modality == "CT":
        return task.intensity.display
    low, high = np.percentile(volume, [0.5, 99.5])  # MR: stretched to the scan, as the overlays do
    return (low + high) / 2, max(high - low, 1e-6)


def write_uncertainty_picture(image: tuple, seg, task: Task, out: str | Path, case: str) -> Path:
    """`<case>_uncertainty.png` of a `Segmentation` carrying an uncertainty map, beside its scan.

    Args:
        image: the scan as an (array (C, X, Y, Z) or (X, Y, Z), Grid) pair, on the segmentation's grid.
    """
    from PIL import Image, ImageDraw

    from medseg.geometry import grow_mm
    from medseg.io import atomic_path
    from medseg.review.views import MARGIN_MM, VIEWS, canonical, slice_position, view_slice, view_spacing

    array, grid = image
    volume = array[0] if array.ndim == 4 else array
    box = (grow_mm(seg.extent, grid.spacing, grid.shape, MARGIN_MM) if seg.extent is not None
           else tuple(slice(0, n) for n in grid.shape))
    cut = grid.crop(box)
    volume_c, grid_c = canonical(volume[box], cut)
    labels_c, uncertainty_c = (canonical(a[box], cut)[0] for a in (seg.labels, seg.uncertainty))
    index = int(np.argmax(uncertainty_c.sum(axis=(0, 1))))
    view = VIEWS[0]
    spacing = view_spacing(grid_c.spacing, view)
    picture = view_slice(volume_c, view, index)
    pixel_mm = max(picture.shape[1] * spacing[1] / PICTURE_SIZE[0], picture.shape[0] * spacing[0] / PICTURE_SIZE[1])
    colors = {label.id: label.color for label in task.labels}
    rgb = uncertainty_picture(picture, view_slice(labels_c, view, index), view_slice(uncertainty_c, view, index),
                              colors, _window(task, volume_c), spacing, pixel_mm=pixel_mm)
    canvas = Image.fromarray(rgb)
    text = f"uncertainty, {slice_position(grid_c, 2, index)}; yellow to red: 0 to {HEAT_FULL}+"
    ImageDraw.Draw(canvas).text((4, 4), text, fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
    path = Path(out) / f"{case}_uncertainty.png"
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG", compress_level=3)
    return path
