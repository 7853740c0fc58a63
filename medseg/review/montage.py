"""Tiles of one view laid out under a header, and the review page's one-slice thumbnail (PIL, imported lazily)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medseg.io import Grid
from medseg.review.render import Color, render_slice
from medseg.review.views import (VIEWS, View, choose_slices, shown_box, mask_extents, slice_position, view_slice, view_spacing)

WIDTH = 1600  # px: the montage fills a laptop screen at 100 % zoom
COLUMNS = 4  # tiles per montage row
GAP = 8  # px between tiles
LEGEND_COLUMNS = 3  # organs per legend row: room for "name: volume (ref volume), Dice"
MAX_TILE_HEIGHT = 560  # px: long coronal/sagittal tiles shrink so that two rows fit on a screen
THUMB_SIZE = (360, 300)  # px, (width, height) at most: the review page's thumbnail, one axial slice


@dataclass(frozen=True)
class Tile:
    rgb: np.ndarray  # (H, W, 3) uint8
    position: str  # slice position, e.g. "S 12.5 mm"
    note: str = ""  # why this slice was chosen, when it matters (largest disagreement)


def render_view(image: np.ndarray, prediction: np.ndarray, grid: Grid, view: View, colors: Mapping[int, Color],
                window: tuple[float, float], reference: np.ndarray | None = None,
                extents: Sequence[dict] | None = None) -> list[Tile]:
    """The tiles of one view of canonical (L, P, S) arrays on `grid` (see `canonical`), all of one size.

    Tiles run in reading order as a radiologist scrolls: axial head to feet, coronal front to back,
    sagittal right to left. `extents`: the `mask_extents` of prediction (and reference), if known.
    """
    extents = extents or mask_extents(prediction, reference)
    crop = shown_box(extents, prediction.shape, grid.spacing)
    slices = choose_slices(prediction, view.axis, reference=reference, extents=extents)
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
        tiles.append(Tile(rgb, slice_position(grid, view.axis, index), note))
    return tiles


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


def _header_height(notes: Sequence[str], legend: Sequence[tuple[Color, str]]) -> int:
    return 14 + 30 + 22 * len(notes) + 26 * math.ceil(len(legend) / LEGEND_COLUMNS) + 6


def _draw_header(draw, title: str, notes: Sequence[str], legend: Sequence[tuple[Color, str]]) -> None:
    """Title, notes and the colour legend across the top WIDTH pixels (`_header_height` tall)."""
    small = _font(16)
    draw.text((GAP, 12), title, font=_font(22), fill=(255, 255, 255))
    y = 44
    for note in notes:
        draw.text((GAP, y), note, font=small, fill=(210, 210, 210))
        y += 22
    for i, (color, text) in enumerate(legend):
        x, yy = GAP + (i % LEGEND_COLUMNS) * (WIDTH // LEGEND_COLUMNS), y + (i // LEGEND_COLUMNS) * 26
        draw.rectangle((x, yy + 2, x + 16, yy + 18), fill=tuple(color), outline=(255, 255, 255))
        draw.text((x + 24, yy), text, font=small, fill=(255, 255, 255))


def single_picture(rgb: np.ndarray, title: str, notes: Sequence[str], legend: Sequence[tuple[Color, str]]) -> np.ndarray:
    """One picture (a 2D image's overlay) under the montages' header, centred; returns (H, WIDTH, 3) uint8."""
    from PIL import Image, ImageDraw

    header = _header_height(notes, legend)
    h, w = rgb.shape[:2]
    canvas = Image.new("RGB", (max(WIDTH, w + 2 * GAP), header + h + GAP), (16, 16, 16))
    _draw_header(ImageDraw.Draw(canvas), title, notes, legend)
    canvas.paste(Image.fromarray(rgb), ((canvas.width - w) // 2, header))
    return np.asarray(canvas)


def montage(tiles: Sequence[Tile], view: View, title: str, notes: Sequence[str],
            legend: Sequence[tuple[Color, str]]) -> np.ndarray:
    """Tiles in rows of COLUMNS under a header (title, notes, colour legend); returns (H, WIDTH, 3) uint8."""
    from PIL import Image, ImageDraw

    small = _font(16)
    header = _header_height(notes, legend)
    cell = (WIDTH - (COLUMNS + 1) * GAP) // COLUMNS
    tile_h = max((t.rgb.shape[0] for t in tiles), default=0)
    rows = math.ceil(len(tiles) / COLUMNS)
    canvas = Image.new("RGB", (WIDTH, header + rows * (tile_h + GAP) + GAP), (16, 16, 16))
    draw = ImageDraw.Draw(canvas)
    _draw_header(draw, title, notes, legend)
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
              window: tuple[float, float], reference: np.ndarray | None = None,
              extents: Sequence[dict] | None = None) -> np.ndarray:
    """One annotated axial tile of canonical arrays, at most THUMB_SIZE: the review page's thumbnail.

    The slice is where prediction and reference differ most, else where the organs cover most
    pixels, else the middle of the scan: the one slice a reviewer should see first.

    Returns:
        (H, W, 3) uint8.
    """
    from PIL import Image, ImageDraw

    view = VIEWS[0]
    labels = [prediction] + ([reference] if reference is not None else [])
    crop = shown_box(extents or mask_extents(prediction, reference), prediction.shape, grid.spacing)
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
    _annotate(ImageDraw.Draw(canvas), (0, 0), Tile(rgb, slice_position(grid, 2, crop[2].start + local), note), view,
              _font(16), _font(13))
    return np.asarray(canvas)
