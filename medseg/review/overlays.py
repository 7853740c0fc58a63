"""Overlay files for one case: read and check the inputs, put them in radiological order, write the PNGs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from medseg.config import DEFAULT_COLORS, Task
from medseg.errors import InputError
from medseg.io import Grid, atomic_path, case_name, read_image, read_label
from medseg.evaluate.metrics import dice
from medseg.geometry import voxel_counts
from medseg.planar import is_planar
from medseg.review.montage import GAP, THUMB_SIZE, WIDTH, montage, render_view, single_picture, thumbnail
from medseg.review.render import render_slice
from medseg.review.views import VIEWS, canonical, mask_extents, shown_box


def _load(source, what: str, labels: bool, dimensions: int = 3) -> tuple[np.ndarray, Grid, str]:
    """(X, Y, Z) labels or (C, X, Y, Z) image, its grid and a name for messages, from a path or an (array,
    Grid) pair."""
    if isinstance(source, (str, Path)):
        array, grid = read_label(source, dimensions) if labels else read_image(source, dimensions=dimensions)
        return array, grid, str(source)
    if not (isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], Grid)):
        raise InputError(f"{what} must be a path or an (array, Grid) pair, got {type(source).__name__}")
    array, grid = np.asarray(source[0]), source[1]
    if array.ndim not in ((3,) if labels else (3, 4)) or array.shape[-3:] != grid.shape:
        raise InputError(f"{what} array of shape {array.shape} does not fit its grid ({grid.describe()})")
    if not labels and array.ndim == 3:
        array = array[None]
    if labels and (array.dtype.kind not in "iub" or array.min(initial=0) < 0 or array.max(initial=0) > 255):
        raise InputError(f"{what} must hold integer labels in 0..255, got {array.dtype} values")
    return (array.astype(np.uint8, copy=False) if labels else array), grid, f"the given {what} array"


def _window(task: Task, image: np.ndarray) -> tuple[tuple[float, float], str]:
    if task.modality == "CT":
        level, width = task.intensity.display
        return (level, width), f"CT window L{level:g} W{width:g}"
    low, high = np.percentile(image, [0.5, 99.5])  # MR has no absolute scale: stretch to the image
    return ((low + high) / 2, max(high - low, 1e-6)), "window: 0.5-99.5th percentile of the scan"


def legend_entries(task: Task, prediction: np.ndarray, reference: np.ndarray | None, voxel_ml: float,
                   unit: str = "mL"):
    """Colours, legend lines and mean Dice (NaN without a reference) of every organ of the task and mask.

    `voxel_ml` is a voxel's size in `unit` (a 2D image's pixel area: "mm²"); sizes are shown in the unit
    that reads (`medseg.units`: "nucleus: 80 um2"), prediction and reference in the same one.

    Returns:
        ({label: RGB}, [(RGB, "organ: 12.3 mL (ref 11.9), Dice 0.93")], mean Dice).
    """
    from medseg.units import display_unit, number, plain

    names = task.label_names
    colors = {label.id: label.color for label in task.labels}
    pred_counts = voxel_counts(prediction)
    for value in np.flatnonzero(pred_counts[1:]) + 1:
        if value not in names:
            names[int(value)], colors[int(value)] = f"label {value} (not in task)", DEFAULT_COLORS[(value - 1) % 12]
    lines, scores = [], []
    if reference is not None:
        ref_counts = voxel_counts(reference)
        both = voxel_counts(prediction[prediction == reference])
    for value, name in names.items():
        found = pred_counts[value] * voxel_ml
        given = None if reference is None else ref_counts[value] * voxel_ml
        factor, shown = display_unit(max(found, given or 0.0), unit)
        text = f"{name}: {number(found * factor)} {plain(shown)}"
        if reference is not None:
            score = dice(both[value], pred_counts[value] - both[value], ref_counts[value] - both[value])
            scores.append(score)
            text += f" (ref {number(given * factor)}), Dice " + ("n/a" if np.isnan(score) else f"{score:.2f}")
        lines.append((colors[value], text))
    mean = float(np.nanmean(scores)) if scores and not np.isnan(scores).all() else float("nan")
    return colors, lines, mean


def write_overlays(image, mask, task: Task, out: str | Path, reference=None, case: str | None = None) -> list[Path]:
    """Write `<case>_axial.png`, `<case>_coronal.png`, `<case>_sagittal.png` and `<case>_thumb.png` into `out`.

    Args:
        image: scan path, or (array (X, Y, Z) or (C, X, Y, Z), Grid) already in memory.
        mask: label map path, or (uint8 (X, Y, Z), Grid); it must lie on the scan's grid.
        task: gives organ names, colours and the display window.
        out: output folder, created if needed.
        reference: optional reference label map (path or pair) on the same grid: drawn dashed, with Dice.
        case: file name prefix; default the scan's file name without suffix.

    Returns:
        The four PNG paths (written atomically): the three montages, then the thumbnail; for a 2D image
        (task `dimensions: 2`) two, `<case>_overlay.png` and the thumbnail (`write_planar_overlay`).
    """
    channels, grid, image_name = _load(image, "image", labels=False, dimensions=task.dimensions)
    prediction, mask_grid, mask_name = _load(mask, "mask", labels=True, dimensions=task.dimensions)
    ref, ref_name = None, None
    if reference is not None:
        ref, ref_grid, ref_name = _load(reference, "reference", labels=True, dimensions=task.dimensions)
    for name, other in [(mask_name, mask_grid)] + ([(ref_name, ref_grid)] if ref is not None else []):
        if not grid.matches(other):
            raise InputError(f"{name} ({other.describe()}) is not on the grid of {image_name} ({grid.describe()})")
    case = case or (case_name(image) if isinstance(image, (str, Path)) else "case")
    if is_planar(grid.shape):  # three channels (RGB) in colour, any other number by the first in grey
        picture = channels[..., 0] if len(channels) == 3 else channels[0, ..., 0]
        return write_planar_overlay(picture, prediction[..., 0], None if ref is None else ref[..., 0],
                                    grid.spacing[:2], task, Path(out), case)
    volume = channels[0]  # a multi-channel scan is shown by its first channel
    colors, legend, mean_dice = legend_entries(task, prediction, ref, grid.voxel_volume_ml)
    # Every picture shows the organs' box only: cut it out once, so that choosing slices and drawing
    # them touch a few organs' worth of voxels, not a whole 512 x 512 CT, over and over.
    box = shown_box(mask_extents(prediction, ref), prediction.shape, grid.spacing)
    grid = grid.crop(box)
    volume_c, grid_c = canonical(volume[box], grid)
    prediction_c = np.ascontiguousarray(canonical(prediction[box], grid)[0])  # find_objects: ~6x faster
    ref_c = np.ascontiguousarray(canonical(ref[box], grid)[0]) if ref is not None else None
    extents = mask_extents(prediction_c, ref_c)
    window, window_text = _window(task, volume_c[shown_box(extents[:1], prediction_c.shape, grid_c.spacing)])
    style = "prediction: solid outline + fill"
    if ref is not None:
        style += f"   reference: dashed outline   mean Dice {mean_dice:.3f}"
    notes = [f"{window_text}   {style}   positions: scanner coordinates"]
    if not np.allclose(np.abs(np.reshape(grid_c.direction, (3, 3))), np.eye(3), atol=0.02):
        notes.append("oblique scan: shown in its nearest axis-aligned orientation, not resliced")
    if not prediction.any():
        notes.append("no organ in the mask" + ("" if ref is None or not ref.any() else " (reference has organs)"))
    # Tiles are drawn and PNGs encoded by two worker threads (numpy and zlib let go of the GIL), while
    # this thread lays out the montages: text goes through FreeType, which is kept to one thread.
    # Each PNG is queued as soon as its picture is laid out, behind the tiles still being drawn.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="medseg-overlay") as pool:
        tiles = {view.name: pool.submit(render_view, volume_c, prediction_c, grid_c, view, colors, window,
                                        reference=ref_c, extents=extents) for view in VIEWS}
        thumb = thumbnail(volume_c, prediction_c, grid_c, colors, window, reference=ref_c, extents=extents)
        written = {"thumb": pool.submit(_write_png, thumb, Path(out) / f"{case}_thumb.png")}
        for view in VIEWS:
            picture = montage(tiles[view.name].result(), view, f"{case} - {view.name}, {view.caption}", notes, legend)
            written[view.name] = pool.submit(_write_png, picture, Path(out) / f"{case}_{view.name}.png")
        return [written[name].result() for name in [view.name for view in VIEWS] + ["thumb"]]


def write_planar_overlay(image: np.ndarray, prediction: np.ndarray, reference: np.ndarray | None,
                         spacing: tuple[float, float], task: Task, out: Path, case: str) -> list[Path]:
    """A 2D image's overlay, `<case>_overlay.png`, and its thumbnail `<case>_thumb.png`.

    The image is shown as stored (row 0 at the top, X across): no patient orientation to restore. Small
    images are enlarged (up to 8x) to fill the picture's width, large ones shrunk to it.

    Args:
        image: (X, Y) grey, or (3, X, Y) RGB: shown in colour, the three channels stretched together.
        prediction, reference: (X, Y) label maps of the image's grid; `spacing` its (X, Y) pixel size in mm.
    """
    picture = image.T if image.ndim == 2 else np.moveaxis(image, 0, -1).transpose(1, 0, 2)  # (Y, X[, 3])
    labels = prediction.T  # (rows = Y, columns = X)
    ref = None if reference is None else reference.T
    pixel = (spacing[1], spacing[0])  # (row, column) mm
    colors, legend, mean_dice = legend_entries(task, prediction, reference, spacing[0] * spacing[1], "mm²")
    window, window_text = _window(task, picture)
    style = "prediction: solid outline + fill" + ("" if ref is None else f"   reference: dashed outline   "
                                                                          f"mean Dice {mean_dice:.3f}")
    notes = [f"{window_text}   {style}   image as stored: first row at the top"]
    width_mm, height_mm = labels.shape[1] * pixel[1], labels.shape[0] * pixel[0]
    pixel_mm = max(width_mm / (WIDTH - 2 * GAP), height_mm / 1200, min(pixel) / 8)
    rgb = render_slice(picture, labels, colors, window, pixel, reference2d=ref, pixel_mm=pixel_mm)
    kind = "2D image" if picture.ndim == 2 else "2D RGB image"
    full = single_picture(rgb, f"{case} - {kind}, {labels.shape[1]}x{labels.shape[0]} pixels", notes, legend)
    thumb_mm = max(width_mm / THUMB_SIZE[0], height_mm / THUMB_SIZE[1])
    thumb = render_slice(picture, labels, colors, window, pixel, reference2d=ref, pixel_mm=thumb_mm)
    return [_write_png(full, out / f"{case}_overlay.png"), _write_png(thumb, out / f"{case}_thumb.png")]


def _write_png(rgb: np.ndarray, path: Path) -> Path:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG", compress_level=3)  # smaller and 2.5x faster than 6, measured
    return path
