"""One slice as a picture: the scan in its window, organ fills and outlines, square pixels in mm."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

Color = tuple[int, int, int]

FILL_ALPHA = 0.25  # opacity of the prediction's fill; its outline is opaque
DASH_PX = 8  # length of the reference outline's dashes


def _resize(values: np.ndarray, shape: Sequence[int],
            window: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
    """Linear interpolation of a 2D array to `shape`, pixel centres aligned; box-smoothed first when shrinking.

    `window` ((row0, row1), (col0, col1)) computes only those output pixels: the same values as the
    whole picture's, cut. Separable gathers rather than matrix products: small BLAS calls thrash on a
    busy 2-core machine.
    """
    out = values.astype(np.float32)
    for axis, n_out in enumerate(shape):
        n_in = values.shape[axis]
        scale = n_in / n_out
        if scale > 1.5:  # averaging over the pixels each output pixel covers avoids aliasing
            out = ndimage.uniform_filter1d(out, size=int(round(scale)), axis=axis, mode="nearest")
        first, stop = window[axis] if window is not None else (0, n_out)
        x = np.clip((np.arange(first, stop) + 0.5) * scale - 0.5, 0, n_in - 1)
        low = np.floor(x).astype(int)
        weight = (x - low).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(2)])
        out = np.take(out, low, axis) * (1 - weight) + np.take(out, np.minimum(low + 1, n_in - 1), axis) * weight
    return out


def _organ_window(organ: np.ndarray, shape: Sequence[int], margin: int = 4) -> tuple[tuple[int, int], ...]:
    """The output pixels (`_resize` to `shape`) that an organ's mask, fill or outline can reach.

    An output pixel reads the two input pixels around its centre, after a box filter of `scale`
    pixels when shrinking; `margin` output pixels more hold the outlines drawn outside the mask.
    Drawing inside this window only gives the same picture as drawing on the whole slice.
    """
    window = []
    for axis, n_out in enumerate(shape):
        hit = np.flatnonzero(organ.any(axis=1 - axis))
        n_in = organ.shape[axis]
        scale = n_in / n_out
        reach = 2 + (int(round(scale)) if scale > 1.5 else 0)  # input pixels that feed one output pixel
        first = math.floor((hit[0] - reach + 0.5) / scale - 0.5) - margin
        stop = math.ceil((hit[-1] + reach + 0.5) / scale - 0.5) + margin + 1
        window.append((max(first, 0), min(stop, n_out)))
    return tuple(window)


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

    The scan is shown in the window (an RGB image's three channels through the same window); each organ of `labels2d` as a translucent fill with a solid
    2-px outline, each organ of `reference2d` as a dashed 3-px outline, in the organ's colour.
    Organ masks are interpolated before their outlines are traced, so outlines stay smooth when
    thick slices are stretched.

    Args:
        image2d: (H0, W0) intensities, or (H0, W0, 3) RGB; row 0 is the top of the picture.
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
    colour = image2d.ndim == 3 and image2d.shape[2] == 3
    if (image2d.ndim != 2 and not colour) or labels2d.shape != image2d.shape[:2]:
        raise ValueError(f"expected a 2D image (grey, or RGB as (H, W, 3)) and labels of the same shape, got "
                         f"{image2d.shape} and {labels2d.shape}")
    if reference2d is not None and np.shape(reference2d) != labels2d.shape:
        raise ValueError(f"reference of shape {np.shape(reference2d)} does not match the image {image2d.shape}")
    level, width = window
    if not width > 0 or min(pixel_spacing) <= 0:
        raise ValueError(f"window width and pixel spacing must be positive, got {window} and {pixel_spacing}")
    pixel_mm = float(pixel_mm or min(pixel_spacing))
    shape = [max(1, round(n * s / pixel_mm)) for n, s in zip(labels2d.shape, pixel_spacing)]
    planes = [image2d[..., c] for c in range(3)] if colour else [image2d]
    shown = [np.clip((_resize(plane, shape) - (level - width / 2)) / width, 0.0, 1.0) * 255 for plane in planes]
    rgb = np.stack(shown, axis=-1) if colour else np.repeat(shown[0][..., None], 3, axis=-1)
    layers = [(labels2d, False)] + ([(np.asarray(reference2d), True)] if reference2d is not None else [])
    outlines = []
    for labels, is_reference in layers:
        for value in np.unique(labels):
            if value == 0 or int(value) not in colors:
                continue
            color = np.asarray(colors[int(value)], np.float32)
            organ = labels == value
            window = _organ_window(organ, shape)  # an organ covers a small part of a tile: draw only there
            part = tuple(slice(*span) for span in window)
            mask = _resize(organ, shape, window) >= 0.5
            if is_reference:
                outlines.append((part, _dashes(_outline(mask, inside=1, outside=2)), color))
            else:
                region = rgb[part]
                region[mask] = region[mask] * (1 - FILL_ALPHA) + color * FILL_ALPHA
                outlines.append((part, _outline(mask, inside=2), color))
    for part, band, color in outlines:  # after every fill, so no fill tints another organ's outline
        rgb[part][band] = color
    return np.round(rgb).astype(np.uint8)
