"""Overlay montages for clinician review: a scan with its organ outlines, in radiological convention.

Three layers, as in nnU-Net: `render_slice` is a pure function from one 2D slice, its labels, the
colours and the window to an RGB array; `render_view` picks and orients the slices of one view and
`montage` lays them out with legend and annotations (PIL, imported lazily), `thumbnail` makes the
review page's one-slice preview; `write_overlays` reads, checks and writes the PNG files.

Slices follow the organs: spread over the slices that hold one, denser where organs meet, each organ
crossed through its central half, and with a reference the slices where it and the prediction differ
most. Tiles run as a radiologist scrolls (axial head to feet, coronal front to back, sagittal right
to left). The legend names each organ with its volume in mL (and, with a reference, the reference
volume and the Dice).

Every picture is drawn from a copy of the scan whose voxel axes point to the patient's Left, Posterior
and Superior (`canonical`: the nearest axis-aligned orientation, as `sitk.DICOMOrient(image, "LPS")`,
by permuting and flipping axes, never resampling), so the voxel order of the file never changes it:

- axial: viewed from the feet, patient's right on the image left, anterior up;
- coronal: viewed from the front, patient's right on the image left, superior up;
- sagittal: viewed from the patient's left, anterior on the image left, superior up.

Pixels are square in millimetres (thick slices are stretched, never squashed), and each tile carries
orientation letters on its edges and its position in scanner (LPS) coordinates, written with the
direction letter, e.g. `S 12.5 mm`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.config import DEFAULT_COLORS, Task
from medseg.errors import InputError
from medseg.io import Grid, atomic_path, case_name, read_image, read_label
from medseg.metrics import dice

Color = tuple[int, int, int]

WIDTH = 1600  # px: the montage fills a laptop screen at 100 % zoom
COLUMNS = 4  # tiles per montage row
GAP = 8  # px between tiles
LEGEND_COLUMNS = 3  # organs per legend row: room for "name: volume (ref volume), Dice"
TILES = 8  # slices per view
DISAGREEMENT_TILES = 2  # of TILES, with a reference: the slices where reference and prediction differ most
MAX_TILE_HEIGHT = 560  # px: long coronal/sagittal tiles shrink so that two rows fit on a screen
THUMB_SIZE = (360, 300)  # px, (width, height) at most: the review page's thumbnail, one axial slice
MARGIN_MM = 20.0  # tissue shown around the organs' bounding box
FILL_ALPHA = 0.25  # opacity of the prediction's fill; its outline is opaque
DASH_PX = 8  # length of the reference outline's dashes


@dataclass(frozen=True)
class View:
    name: str
    axis: int  # canonical (L, P, S) axis the slices are taken along
    edges: tuple[str, str, str, str]  # letters on the top, bottom, left and right edges
    caption: str


VIEWS = (
    View("axial", 2, ("A", "P", "R", "L"), "seen from the feet: patient's right on image left, anterior up"),
    View("coronal", 1, ("S", "I", "R", "L"), "seen from the front: patient's right on image left, superior up"),
    View("sagittal", 0, ("S", "I", "A", "P"), "seen from the patient's left: anterior on image left, superior up"),
)


@dataclass(frozen=True)
class Tile:
    rgb: np.ndarray  # (H, W, 3) uint8
    position: str  # slice position, e.g. "S 12.5 mm"
    note: str = ""  # why this slice was chosen, when it matters (largest disagreement)


# ------------------------------------------------------------------------------------ one slice


def _resize(values: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Linear interpolation of a 2D array to `shape`, pixel centres aligned; box-smoothed first when shrinking.

    Separable gathers rather than matrix products: small BLAS calls thrash on a busy 2-core machine.
    """
    out = values.astype(np.float32)
    for axis, n_out in enumerate(shape):
        n_in = out.shape[axis]
        scale = n_in / n_out
        if scale > 1.5:  # averaging over the pixels each output pixel covers avoids aliasing
            out = ndimage.uniform_filter1d(out, size=int(round(scale)), axis=axis, mode="nearest")
        x = np.clip((np.arange(n_out) + 0.5) * scale - 0.5, 0, n_in - 1)
        low = np.floor(x).astype(int)
        weight = (x - low).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(2)])
        out = np.take(out, low, axis) * (1 - weight) + np.take(out, np.minimum(low + 1, n_in - 1), axis) * weight
    return out


def _outline(mask: np.ndarray, inside: int, outside: int = 0) -> np.ndarray:
    """Band along a mask's edge, `inside` px into it and `outside` px beyond; the image border is no edge."""
    band = mask & ~ndimage.binary_erosion(mask, iterations=inside, border_value=1)
    if outside:
        band |= ndimage.binary_dilation(mask, iterations=outside) & ~mask
    return band


def _dashes(band: np.ndarray) -> np.ndarray:
    """Keep every other DASH_PX stretch of a band, measured along the band (geodesic distance from one end)."""
    rows, cols = np.nonzero(band)
    if rows.size == 0:
        return band
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components, dijkstra

    node = np.full(band.shape, -1)
    node[rows, cols] = np.arange(rows.size)
    edges = []
    for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):  # each 8-neighbour pair once
        r, c = rows + dr, cols + dc
        inside = (r < band.shape[0]) & (c >= 0) & (c < band.shape[1])
        other = np.full(rows.size, -1)
        other[inside] = node[r[inside], c[inside]]
        linked = np.flatnonzero(other >= 0)
        edges.append((linked, other[linked], np.full(linked.size, np.hypot(dr, dc))))
    source, target, length = (np.concatenate(e) for e in zip(*edges))
    graph = coo_matrix((length, (source, target)), shape=(rows.size, rows.size)).tocsr()
    _, piece = connected_components(graph, directed=False)
    starts = np.unique(piece, return_index=True)[1]  # the first pixel (top-left) of each piece
    distance = dijkstra(graph, directed=False, indices=starts, min_only=True)
    keep = (distance // DASH_PX) % 2 == 0
    dashed = np.zeros_like(band)
    dashed[rows[keep], cols[keep]] = True
    return dashed


def render_slice(image2d: np.ndarray, labels2d: np.ndarray, colors: Mapping[int, Color],
                 window: tuple[float, float], pixel_spacing: tuple[float, float],
                 reference2d: np.ndarray | None = None, pixel_mm: float | None = None) -> np.ndarray:
    """One slice as an RGB picture with square pixels.

    The scan is shown in the window; each organ of `labels2d` as a translucent fill with a solid
    2-px outline, each organ of `reference2d` as a dashed 3-px outline, in the organ's colour.
    Organ masks are interpolated before their outlines are traced, so outlines stay smooth when
    thick slices are stretched.

    Args:
        image2d: (H0, W0) intensities; row 0 is the top of the picture.
        labels2d: (H0, W0) label map, 0 = background; labels without a colour are not drawn.
        colors: RGB (0..255) per label value.
        window: (level, width) in image units, e.g. (40, 400) HU for soft tissue.
        pixel_spacing: (row, column) size of an input pixel in mm.
        reference2d: optional (H0, W0) reference label map.
        pixel_mm: output pixel size in mm; default the finer of `pixel_spacing`.

    Returns:
        (H, W, 3) uint8 with H = round(H0 * row / pixel_mm) and W = round(W0 * column / pixel_mm).
    """
    image2d, labels2d = np.asarray(image2d), np.asarray(labels2d)
    if image2d.ndim != 2 or labels2d.shape != image2d.shape:
        raise ValueError(f"expected a 2D image and labels of the same shape, got {image2d.shape} and {labels2d.shape}")
    if reference2d is not None and np.shape(reference2d) != image2d.shape:
        raise ValueError(f"reference of shape {np.shape(reference2d)} does not match the image {image2d.shape}")
    level, width = window
    if not width > 0 or min(pixel_spacing) <= 0:
        raise ValueError(f"window width and pixel spacing must be positive, got {window} and {pixel_spacing}")
    pixel_mm = float(pixel_mm or min(pixel_spacing))
    shape = [max(1, round(n * s / pixel_mm)) for n, s in zip(image2d.shape, pixel_spacing)]
    grey = np.clip((_resize(image2d, shape) - (level - width / 2)) / width, 0.0, 1.0) * 255
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    layers = [(labels2d, False)] + ([(np.asarray(reference2d), True)] if reference2d is not None else [])
    outlines = []
    for labels, is_reference in layers:
        for value in np.unique(labels):
            if value == 0 or int(value) not in colors:
                continue
            color = np.asarray(colors[int(value)], np.float32)
            mask = _resize(labels == value, shape) >= 0.5
            if is_reference:
                outlines.append((_dashes(_outline(mask, inside=1, outside=2)), color))
            else:
                rgb[mask] = rgb[mask] * (1 - FILL_ALPHA) + color * FILL_ALPHA
                outlines.append((_outline(mask, inside=2), color))
    for band, color in outlines:  # after every fill, so no fill tints another organ's outline
        rgb[band] = color
    return np.round(rgb).astype(np.uint8)


# ------------------------------------------------------------------------- orientation and views


def canonical(array: np.ndarray, grid: Grid) -> tuple[np.ndarray, Grid]:
    """An (X, Y, Z) array with its axes permuted and flipped to point to the patient's Left, Posterior, Superior.

    The nearest axis-aligned orientation, as `sitk.DICOMOrient(image, "LPS")`: voxels are only
    reordered (a view, no copy), so an oblique scan keeps its small tilt in the returned grid.
    """
    direction = np.reshape(grid.direction, (3, 3))
    # perm[w] is the voxel axis running closest to world axis w
    perm = max(itertools.permutations(range(3)), key=lambda p: sum(abs(direction[w, p[w]]) for w in range(3)))
    shape = tuple(grid.shape[p] for p in perm)
    index_map = np.eye(4)[:, [*perm, 3]]  # canonical index -> file index
    out = np.transpose(array, perm)
    for w, p in enumerate(perm):
        if direction[w, p] < 0:
            out = np.flip(out, w)
            index_map[p, w], index_map[p, 3] = -1.0, shape[w] - 1
    affine = grid.affine @ index_map
    spacing = tuple(grid.spacing[p] for p in perm)
    return out, Grid(shape, spacing, tuple(affine[:3, 3]), tuple((affine[:3, :3] / np.asarray(spacing)).ravel()))


def view_slice(volume: np.ndarray, view: View, index: int) -> np.ndarray:
    """Slice `index` of a canonical (L, P, S) volume as a picture (row 0 at the top)."""
    if view.axis == 2:
        return volume[:, :, index].T  # rows anterior -> posterior, columns right -> left
    if view.axis == 1:
        return volume[:, index, :].T[::-1]  # rows superior -> inferior, columns right -> left
    return volume[index, :, :].T[::-1]  # rows superior -> inferior, columns anterior -> posterior


def view_spacing(spacing: Sequence[float], view: View) -> tuple[float, float]:
    """(row, column) pixel size in mm of `view_slice` pictures of a canonical volume with `spacing`."""
    rows, cols = {2: (1, 0), 1: (2, 0), 0: (2, 1)}[view.axis]
    return float(spacing[rows]), float(spacing[cols])


def _position(grid: Grid, axis: int, index: int) -> str:
    """World position of a slice's centre along its axis, with the direction letter: 'S 12.5 mm'."""
    centre = [(n - 1) / 2 for n in grid.shape]
    centre[axis] = index
    value = float((grid.affine @ [*centre, 1.0])[axis])
    letter = ("RL", "AP", "IS")[axis][value >= 0]
    return f"{letter} {abs(value):.1f} mm"


def _extents(labels: np.ndarray) -> dict[int, tuple[slice, ...]]:
    return {value: box for value, box in enumerate(ndimage.find_objects(labels), start=1) if box is not None}


def choose_slices(prediction: np.ndarray, axis: int, count: int = TILES,
                  reference: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Slices to show along `axis` of (X, Y, Z) label maps, as sorted (index, differing voxels) pairs.

    With a reference, the DISAGREEMENT_TILES slices where more voxels differ than anywhere else are
    chosen first and carry their count of differing voxels (the other slices carry 0). The rest are
    spread over the slices that hold an organ, denser where more organs meet; an organ whose central
    half no slice crosses gets one through its centre, so that no organ is shown only by a sliver at
    its edge. Without any organ, the slices spread evenly over the whole volume.
    """
    boxes = [_extents(prediction)] + ([_extents(reference)] if reference is not None else [])
    spans = [(box[axis].start, box[axis].stop - 1) for found in boxes for box in found.values()]
    low, high = (min(s[0] for s in spans), max(s[1] for s in spans)) if spans else (0, prediction.shape[axis] - 1)
    picks: dict[int, int] = {}
    if reference is not None:
        others = tuple(a for a in range(3) if a != axis)
        differs = np.count_nonzero(prediction != reference, axis=others)
        apart = max((high - low + 1) / count, 2)  # disagreement slices at least one spread step apart
        for index in np.argsort(-differs, kind="stable"):
            if len(picks) == DISAGREEMENT_TILES or differs[index] == 0:
                break
            if all(abs(int(index) - p) >= apart for p in picks):
                picks[int(index)] = int(differs[index])
    # Spread in proportion to how many organs each slice crosses: no tile falls in a gap between organs,
    # and where organs meet (the pelvic midline, seen sagittally) gets more tiles than one organ alone.
    weight = np.zeros(prediction.shape[axis])
    for start, stop in spans:
        weight[start:stop + 1] += 1
    if not spans:
        weight[:] = 1
    slots = max(count - len(picks), 0)
    cumulative = np.cumsum(weight)
    targets = np.searchsorted(cumulative, (np.arange(slots) + 0.5) / slots * cumulative[-1], side="right")
    candidates = np.flatnonzero(weight).tolist()
    gap = max(1, len(candidates) // (2 * count))  # tiles closer than this would show nearly the same picture
    taken, spread = list(picks), []
    for target in targets:
        free = ([c for c in candidates if all(abs(c - t) >= gap for t in taken)]
                or [c for c in candidates if c not in taken])
        if not free:
            break
        spread.append(min(free, key=lambda c: abs(c - target)))
        taken.append(spread[-1])
    locked: set[int] = set()
    for start, stop in sorted(spans, key=lambda s: s[1] - s[0]):  # small organs first: they are easiest to miss
        quarter = (stop - start) // 4
        core = (start + quarter, stop - quarter)
        hits = [i for i, s in enumerate(spread) if core[0] <= s <= core[1]]
        if any(core[0] <= p <= core[1] for p in picks) or hits:
            locked.update(hits[:1])
            continue
        free = [i for i in range(len(spread)) if i not in locked]
        if free:
            nearest = min(free, key=lambda i: abs(spread[i] - (start + stop) // 2))
            spread[nearest] = (start + stop) // 2
            locked.add(nearest)
    chosen = {s: 0 for s in spread} | picks
    return sorted(chosen.items())


def _crop(labels: Sequence[np.ndarray], spacing: Sequence[float]) -> tuple[slice, ...]:
    """The organs' bounding box grown by MARGIN_MM, clipped to the volume; the whole volume if no organ."""
    foreground = np.logical_or.reduce([np.asarray(a) > 0 for a in labels])
    box = ndimage.find_objects(foreground.astype(np.uint8))
    if not box or box[0] is None:
        return tuple(slice(0, n) for n in foreground.shape)
    margin = [math.ceil(MARGIN_MM / s) for s in spacing]
    return tuple(slice(max(b.start - m, 0), min(b.stop + m, n)) for b, m, n in zip(box[0], margin, foreground.shape))


def render_view(image: np.ndarray, prediction: np.ndarray, grid: Grid, view: View, colors: Mapping[int, Color],
                window: tuple[float, float], reference: np.ndarray | None = None) -> list[Tile]:
    """The tiles of one view of canonical (L, P, S) arrays on `grid` (see `canonical`), all of one size.

    Tiles run in reading order as a radiologist scrolls: axial head to feet, coronal front to back,
    sagittal right to left.
    """
    crop = _crop([prediction] + ([reference] if reference is not None else []), grid.spacing)
    slices = choose_slices(prediction, view.axis, reference=reference)
    slices = [(i, n) for i, n in slices if crop[view.axis].start <= i < crop[view.axis].stop]
    if view.axis == 2:
        slices.reverse()  # canonical k runs towards Superior
    spacing = view_spacing(grid.spacing, view)
    picture = view_slice(image[crop], view, 0).shape
    cell = (WIDTH - (COLUMNS + 1) * GAP) // COLUMNS
    pixel_mm = max(picture[1] * spacing[1] / cell, picture[0] * spacing[0] / MAX_TILE_HEIGHT)
    tiles = []
    for index, differing in slices:
        local = index - crop[view.axis].start
        ref2d = view_slice(reference[crop], view, local) if reference is not None else None
        rgb = render_slice(view_slice(image[crop], view, local), view_slice(prediction[crop], view, local),
                           colors, window, spacing, reference2d=ref2d, pixel_mm=pixel_mm)
        area_cm2 = differing * spacing[0] * spacing[1] / 100  # "cm2": the default font has no superscript two
        note = f"largest disagreement: {area_cm2:.1f} cm2" if differing else ""
        tiles.append(Tile(rgb, _position(grid, view.axis, index), note))
    return tiles


# ------------------------------------------------------------------------------------- layout


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only a small bitmap font
        return ImageFont.load_default()


def _text(draw, xy: tuple[float, float], text: str, font, fill: Color, align: tuple[float, float]) -> None:
    """Text with a dark halo, placed so that point `align` of its box (0..1 across, 0..1 down) is at `xy`."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=2)
    x, y = xy[0] - left - align[0] * (right - left), xy[1] - top - align[1] * (bottom - top)
    draw.text((x, y), text, font=font, fill=fill, stroke_width=2, stroke_fill=(0, 0, 0))


def montage(tiles: Sequence[Tile], view: View, title: str, notes: Sequence[str],
            legend: Sequence[tuple[Color, str]]) -> np.ndarray:
    """Tiles in rows of COLUMNS under a header (title, notes, colour legend); returns (H, WIDTH, 3) uint8."""
    from PIL import Image, ImageDraw

    big, small = _font(22), _font(16)
    legend_rows = math.ceil(len(legend) / LEGEND_COLUMNS)
    header = 14 + 30 + 22 * len(notes) + 26 * legend_rows + 6
    cell = (WIDTH - (COLUMNS + 1) * GAP) // COLUMNS
    tile_h = max((t.rgb.shape[0] for t in tiles), default=0)
    rows = math.ceil(len(tiles) / COLUMNS)
    canvas = Image.new("RGB", (WIDTH, header + rows * (tile_h + GAP) + GAP), (16, 16, 16))
    draw = ImageDraw.Draw(canvas)
    draw.text((GAP, 12), title, font=big, fill=(255, 255, 255))
    y = 44
    for note in notes:
        draw.text((GAP, y), note, font=small, fill=(210, 210, 210))
        y += 22
    for i, (color, text) in enumerate(legend):
        x, yy = GAP + (i % LEGEND_COLUMNS) * (WIDTH // LEGEND_COLUMNS), y + (i // LEGEND_COLUMNS) * 26
        draw.rectangle((x, yy + 2, x + 16, yy + 18), fill=tuple(color), outline=(255, 255, 255))
        draw.text((x + 24, yy), text, font=small, fill=(255, 255, 255))
    for i, tile in enumerate(tiles):
        h, w = tile.rgb.shape[:2]
        x0 = GAP + (i % COLUMNS) * (cell + GAP) + (cell - w) // 2
        y0 = header + (i // COLUMNS) * (tile_h + GAP)
        canvas.paste(Image.fromarray(tile.rgb), (x0, y0))
        _annotate(draw, (x0, y0), tile, view, _font(20), small)
    return np.asarray(canvas)


def _annotate(draw, corner: tuple[int, int], tile: Tile, view: View, letter_font, font) -> None:
    """Orientation letters on a tile's edges, its position top left and its note below that."""
    (x0, y0), (h, w) = corner, tile.rgb.shape[:2]
    top, bottom, left, right = view.edges
    for letter, (fx, fy) in ((top, (0.5, 0)), (bottom, (0.5, 1)), (left, (0, 0.5)), (right, (1, 0.5))):
        _text(draw, (x0 + 3 + fx * (w - 6), y0 + 3 + fy * (h - 6)), letter, letter_font, (255, 255, 0), (fx, fy))
    _text(draw, (x0 + 4, y0 + 4), tile.position, font, (255, 255, 255), (0, 0))
    if tile.note:
        _text(draw, (x0 + 4, y0 + 8 + font.size), tile.note, font, (255, 130, 130), (0, 0))


def thumbnail(image: np.ndarray, prediction: np.ndarray, grid: Grid, colors: Mapping[int, Color],
              window: tuple[float, float], reference: np.ndarray | None = None) -> np.ndarray:
    """One annotated axial tile of canonical arrays, at most THUMB_SIZE: the review page's thumbnail.

    The slice is where prediction and reference differ most, else where the organs cover most
    pixels, else the middle of the scan: the one slice a reviewer should see first.

    Returns:
        (H, W, 3) uint8.
    """
    from PIL import Image, ImageDraw

    view = VIEWS[0]
    labels = [prediction] + ([reference] if reference is not None else [])
    crop = _crop(labels, grid.spacing)
    inside = [a[crop] for a in labels]
    differs = inside[0] != inside[1] if reference is not None else np.zeros(inside[0].shape, bool)
    where = differs if differs.any() else np.logical_or.reduce([a > 0 for a in inside])
    area = np.count_nonzero(where, axis=(0, 1))
    local = int(np.argmax(area)) if area.any() else area.size // 2
    spacing = view_spacing(grid.spacing, view)
    picture = view_slice(image[crop], view, local)
    pixel_mm = max(picture.shape[1] * spacing[1] / THUMB_SIZE[0], picture.shape[0] * spacing[0] / THUMB_SIZE[1])
    rgb = render_slice(picture, view_slice(inside[0], view, local), colors, window, spacing,
                       reference2d=view_slice(inside[1], view, local) if reference is not None else None,
                       pixel_mm=pixel_mm)
    note = "largest disagreement" if differs.any() else ""
    canvas = Image.fromarray(rgb)
    _annotate(ImageDraw.Draw(canvas), (0, 0), Tile(rgb, _position(grid, 2, crop[2].start + local), note), view,
              _font(16), _font(13))
    return np.asarray(canvas)


# ---------------------------------------------------------------------------------------- files


def _load(source, what: str, labels: bool) -> tuple[np.ndarray, Grid, str]:
    """(X, Y, Z) array, grid and a name for messages, from a path or an (array, Grid) pair."""
    if isinstance(source, (str, Path)):
        array, grid = read_label(source) if labels else read_image(source)
        return (array if labels else array[0]), grid, str(source)
    if not (isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], Grid)):
        raise InputError(f"{what} must be a path or an (array, Grid) pair, got {type(source).__name__}")
    array, grid = np.asarray(source[0]), source[1]
    if not labels and array.ndim == 4:
        array = array[0]  # a multi-channel scan is shown by its first channel
    if array.shape != grid.shape:
        raise InputError(f"{what} array of shape {array.shape} does not fit its grid ({grid.describe()})")
    if labels and (array.dtype.kind not in "iub" or array.min(initial=0) < 0 or array.max(initial=0) > 255):
        raise InputError(f"{what} must hold integer labels in 0..255, got {array.dtype} values")
    return (array.astype(np.uint8, copy=False) if labels else array), grid, f"the given {what} array"


def _window(task: Task, image: np.ndarray) -> tuple[tuple[float, float], str]:
    if task.modality == "CT":
        level, width = task.intensity.display
        return (level, width), f"CT window L{level:g} W{width:g}"
    low, high = np.percentile(image, [0.5, 99.5])  # MR has no absolute scale: stretch to the image
    return ((low + high) / 2, max(high - low, 1e-6)), "window: 0.5-99.5th percentile of the scan"


def legend_entries(task: Task, prediction: np.ndarray, reference: np.ndarray | None, voxel_ml: float):
    """Colours, legend lines and mean Dice (NaN without a reference) of every organ of the task and mask.

    Returns:
        ({label: RGB}, [(RGB, "organ: 12.3 mL (ref 11.9), Dice 0.93")], mean Dice).
    """
    names = task.label_names
    colors = {label.id: label.color for label in task.labels}
    pred_counts = np.bincount(prediction.ravel(), minlength=256)
    for value in np.flatnonzero(pred_counts[1:]) + 1:
        if value not in names:
            names[int(value)], colors[int(value)] = f"label {value} (not in task)", DEFAULT_COLORS[(value - 1) % 12]
    lines, scores = [], []
    if reference is not None:
        ref_counts = np.bincount(reference.ravel(), minlength=256)
        both = np.bincount(prediction[prediction == reference].ravel(), minlength=256)
    for value, name in names.items():
        text = f"{name}: {pred_counts[value] * voxel_ml:.1f} mL"
        if reference is not None:
            score = dice(both[value], pred_counts[value] - both[value], ref_counts[value] - both[value])
            scores.append(score)
            text += f" (ref {ref_counts[value] * voxel_ml:.1f}), Dice " + ("n/a" if np.isnan(score) else f"{score:.2f}")
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
        The four PNG paths (written atomically): the three montages, then the thumbnail.
    """
    volume, grid, image_name = _load(image, "image", labels=False)
    prediction, mask_grid, mask_name = _load(mask, "mask", labels=True)
    ref, ref_name = None, None
    if reference is not None:
        ref, ref_grid, ref_name = _load(reference, "reference", labels=True)
    for name, other in [(mask_name, mask_grid)] + ([(ref_name, ref_grid)] if ref is not None else []):
        if not grid.matches(other):
            raise InputError(f"{name} ({other.describe()}) is not on the grid of {image_name} ({grid.describe()})")
    case = case or (case_name(image) if isinstance(image, (str, Path)) else "case")
    colors, legend, mean_dice = legend_entries(task, prediction, ref, grid.voxel_volume_ml)
    volume_c, grid_c = canonical(volume, grid)
    prediction_c = canonical(prediction, grid)[0]
    ref_c = canonical(ref, grid)[0] if ref is not None else None
    window, window_text = _window(task, volume_c[_crop([prediction_c], grid_c.spacing)])
    style = "prediction: solid outline + fill"
    if ref is not None:
        style += f"   reference: dashed outline   mean Dice {mean_dice:.3f}"
    notes = [f"{window_text}   {style}   positions: scanner coordinates"]
    if not np.allclose(np.abs(np.reshape(grid_c.direction, (3, 3))), np.eye(3), atol=0.02):
        notes.append("oblique scan: shown in its nearest axis-aligned orientation, not resliced")
    if not prediction.any():
        notes.append("no organ in the mask" + ("" if ref is None or not ref.any() else " (reference has organs)"))
    pictures = {}
    for view in VIEWS:
        tiles = render_view(volume_c, prediction_c, grid_c, view, colors, window, reference=ref_c)
        pictures[view.name] = montage(tiles, view, f"{case} - {view.name}, {view.caption}", notes, legend)
    pictures["thumb"] = thumbnail(volume_c, prediction_c, grid_c, colors, window, reference=ref_c)
    return [_write_png(picture, Path(out) / f"{case}_{name}.png") for name, picture in pictures.items()]


def _write_png(rgb: np.ndarray, path: Path) -> Path:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG", compress_level=6)
    return path
