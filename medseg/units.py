"""Sizes as a reader takes them in: a nucleus is "80 µm²", not "0.0 mm²".

medseg keeps every size in mm, mm² and mL in its files (volumes.json, metrics.csv, summary.json, the
instance tables, the fingerprint), whatever the scale of the image. Only what is shown to a person (the
line `medseg predict` prints per case, overlay legends, the review page, `medseg evaluate`'s table, QA
reasons) goes through `readable`: below SMALLER's threshold a size is shown in the next smaller unit
(µm below 0.1 mm, µm² below 0.01 mm², mm³ below 0.01 mL), with about three significant digits.

A 2D image (one slice, `medseg.planar`) has areas: `voxel_size` says what one voxel adds to an organ's
size, a pixel's area in mm² there, a voxel's volume in mL otherwise.
"""

from __future__ import annotations

# unit -> (smaller unit, how many of it make one, below what size in `unit` the smaller one reads better)
SMALLER = {"mm": ("µm", 1e3, 0.1), "mm²": ("µm²", 1e6, 0.01), "mL": ("mm³", 1e3, 0.01)}
SIZE_KEYS = {"mm²": "area_mm2", "mL": "volume_ml"}  # how a size is named in medseg's files
_ASCII = str.maketrans({"µ": "u", "²": "2", "³": "3"})  # the overlays' font has none of these


def display_unit(magnitude: float, unit: str) -> tuple[float, str]:
    """(factor, unit) in which to show sizes of about `magnitude` (given in `unit`: mm, mm² or mL).

    A table column or a legend line picks one from its largest value, so its numbers share a unit.
    """
    if unit not in SMALLER:
        raise ValueError(f"unit '{unit}' is not one of {', '.join(SMALLER)}")
    smaller, factor, below = SMALLER[unit]
    return (factor, smaller) if 0 < abs(magnitude) < below else (1.0, unit)


def number(value: float) -> str:
    """Short and without an exponent for everyday sizes: 0, 0.034 (two digits below 1), 4.0, 12.3, 250, 1234."""
    size = abs(value)
    if size == 0:
        return "0"
    if size >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if size >= 1 else f"{value:.2g}"


def readable(value: float, unit: str, like: float | None = None, ascii: bool = False) -> str:
    """A size with its unit, e.g. readable(0.00008, "mm²") -> "80 µm²", readable(12.34, "mL") -> "12.3 mL".

    Args:
        like: the size whose magnitude picks the unit (default `value`), to keep a row or column in one unit.
        ascii: "um2" rather than "µm²", for text drawn with the overlays' font.
    """
    factor, shown = display_unit(value if like is None else like, unit)
    text = f"{number(value * factor)} {shown}"
    return text.translate(_ASCII) if ascii else text


def plain(unit: str) -> str:
    """A unit written in ASCII ("mm2", "um2"), for text drawn with the overlays' font."""
    return unit.translate(_ASCII)


def voxel_size(grid) -> tuple[float, str]:
    """What one voxel adds to an organ's size on a `medseg.io.Grid`: a 2D image's pixel area ("mm²"), else a
    voxel's volume ("mL"). A one-slice image's third spacing is no thickness, so its areas leave it out."""
    from medseg.planar import is_planar

    if is_planar(grid.shape):
        return float(grid.spacing[0] * grid.spacing[1]), "mm²"
    return float(grid.voxel_volume_ml), "mL"
