"""Synthetic fluorescence-microscopy images of cultured cells: the sample data of the `cells` task.

Each image is a field of a cell culture seen through a widefield microscope: cells with one nucleus each,
packed so that neighbours abut, some pairs placed as just-divided daughters whose nuclei touch or overlap
(as in a 2D projection), and a few small bright specks of debris that are not nuclei. The specimen is
drawn as a map of fluorophore density, then imaged: uneven illumination (vignetting off-centre), the
optics' blur (a Gaussian point spread), photon shot noise (Poisson) and camera read noise (Gaussian)
on a camera offset, stored as uint16 counts.

One channel, on purpose. Real assays mostly use two stains (a DNA stain for nuclei, a cytoplasm stain),
but `medseg predict` reads one file per scan, so a two-file case could be trained on but not predicted
from a folder. Here the single stain marks the whole cell dimly and the nucleus brightly (a cytoplasmic
dye plus a nuclear counterstain in one channel, or a fluorescent protein enriched in the nucleus): the
nucleus edge is a strong step, the cell edge a weak one that fades towards the cell's thin rim, which is
what makes the cytoplasm the harder label, as in practice.

Labels: 1 = nucleus, 2 = cell (the cytoplasm: the cell without its nucleus). Beside them, the nuclei as
instances (each nucleus its own id, uint16) so that instance metrics can be scored. All sizes are in
micrometres; files carry millimetres, as every medseg grid does (0.5 um pixels = 0.0005 mm).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from medseg.errors import InputError

LABELS = {1: "nucleus", 2: "cell"}
PIXEL_UM = 0.5  # a 20x objective on a camera with 10 um pixels: nuclei ~20-28 px across
SHAPE = (256, 256)  # pixels; a 128 x 128 um field holds about a dozen cells


@dataclass(frozen=True)
class Cell:
    """One cell: a star-shaped nucleus inside a star-shaped cell body (um, image coordinates)."""

    nucleus_centre: tuple[float, float]
    nucleus_axes: tuple[float, float]  # semi-axes of the nucleus ellipse
    cell_centre: tuple[float, float]
    cell_scale: float  # cell body radius as a multiple of the nucleus radius in the same direction
    angle: float  # orientation of both ellipses, radians
    wobble: tuple[np.ndarray, np.ndarray]  # (nucleus, cell) Fourier amplitudes, cos+sin per harmonic 2..
    phases: tuple[np.ndarray, np.ndarray]
    dna: float  # nuclear stain brightness (DNA content varies over the cell cycle)
    cytoplasm: float  # cytoplasm stain brightness, relative to the nuclei's
    mitotic: bool = False  # rounded up to divide: condensed chromatin, no nucleoli


@dataclass(frozen=True)
class Field:
    """One imaged field: the image and its ground truth, arrays (X, Y)."""

    image: np.ndarray  # uint16 camera counts
    labels: np.ndarray  # uint8: 0 background, 1 nucleus, 2 cell (cytoplasm)
    instances: np.ndarray  # uint16: 0 background, 1..n one id per nucleus
    cells: np.ndarray  # uint16: 0 background, each cell the id of its nucleus (beyond them: nucleus out of view)
    spacing_mm: tuple[float, float]


# ------------------------------------------------------------------------------------------- specimen


def _new_cell(rng: np.random.Generator, nucleus_centre: tuple[float, float]) -> Cell:
    """An interphase cell, or (1 in 12) one rounded up for mitosis: small, bright condensed chromatin
    in a small round body."""
    rounded = rng.random() < 1 / 12
    major = rng.uniform(3.5, 4.5) if rounded else rng.uniform(5.0, 7.5)
    minor = major * (rng.uniform(0.85, 1.0) if rounded else rng.uniform(0.65, 1.0))
    offset = rng.normal(0, 2.0, 2) * (0.3 if rounded else 1.0)  # the nucleus sits off the cell's centre
    harmonics = (rng.uniform(0, 0.05, 3), rng.uniform(0, 0.12, 4))  # smooth, the cell body more irregular
    phases = (rng.uniform(0, 2 * np.pi, 3), rng.uniform(0, 2 * np.pi, 4))
    return Cell(tuple(nucleus_centre), (major, minor), tuple(np.asarray(nucleus_centre) + offset),
                rng.uniform(1.4, 1.8) if rounded else rng.uniform(1.9, 2.7), rng.uniform(0, np.pi), harmonics,
                phases, dna=rng.uniform(1.4, 2.0) if rounded else rng.uniform(0.6, 1.2),
                cytoplasm=rng.uniform(0.08, 0.25), mitotic=rounded)


def _place_cells(rng: np.random.Generator, extent: np.ndarray) -> list[Cell]:
    """Nuclei placed one by one: each either a daughter touching the last one placed (mitosis leaves
    pairs whose nuclei touch or overlap), or anywhere not too close to the others. The field's edge cuts
    cells, as a camera does; the second cell is always a daughter, so every field has a touching pair."""
    cells: list[Cell] = []
    wanted = int(rng.integers(14, 23)) * extent.prod() / (128.0 * 128.0)
    attempts = 0
    while len(cells) < wanted and attempts < 400:
        attempts += 1
        daughter = bool(cells) and (len(cells) == 1 or rng.random() < 0.3)
        cell = _new_cell(rng, tuple(rng.uniform(-8, extent + 8)))
        if daughter:  # centres one radius of each apart, less up to 20 %: the nuclei touch or overlap
            parent, direction = cells[-1], rng.uniform(0, 2 * np.pi)
            reach = _radius(parent, 0, np.array(direction)) + _radius(cell, 0, np.array(direction + np.pi))
            centre = np.asarray(parent.nucleus_centre) + rng.uniform(0.8, 0.96) * reach * np.array(
                [np.cos(direction), np.sin(direction)])
            cell = replace(cell, nucleus_centre=tuple(centre), cell_centre=tuple(
                centre + np.subtract(cell.cell_centre, cell.nucleus_centre)))
        centre = np.asarray(cell.nucleus_centre)
        others = sorted(np.hypot(*(np.asarray(c.nucleus_centre) - centre)) for c in cells)
        if not daughter and others and others[0] < 1.9 * (cell.nucleus_axes[0] + 6.0):
            continue  # a free cell keeps its distance; daughters alone touch
        if daughter and len(others) > 1 and others[1] < 18.0:
            continue  # a daughter touches its sister only, not a clump of three
        cells.append(cell)
    return cells


def _radius(cell: Cell, which: int, theta: np.ndarray) -> np.ndarray:
    """Boundary radius (um) of the nucleus (which=0) or cell body (1) in directions `theta`."""
    a, b = cell.nucleus_axes
    t = theta - cell.angle
    ellipse = a * b / np.sqrt((b * np.cos(t)) ** 2 + (a * np.sin(t)) ** 2)
    amplitudes, phases = cell.wobble[which], cell.phases[which]
    wobble = 1 + sum(amp * np.cos((k + 2) * t + ph) for k, (amp, ph) in enumerate(zip(amplitudes, phases)))
    return ellipse * wobble * (cell.cell_scale if which else 1.0)


def _reach(cell: Cell, points: tuple[np.ndarray, np.ndarray], which: int) -> np.ndarray:
    """Distance from the shape's centre over its boundary radius: < 1 inside."""
    centre = cell.cell_centre if which else cell.nucleus_centre
    dx, dy = points[0] - centre[0], points[1] - centre[1]
    return np.hypot(dx, dy) / _radius(cell, which, np.arctan2(dy, dx))


def _box(cell: Cell, which: int, points, px: float) -> tuple[slice, slice]:
    """Pixel ranges that hold the nucleus (which=0) or cell body (1): work stays linear in the field's size."""
    centre = cell.cell_centre if which else cell.nucleus_centre
    reach = cell.nucleus_axes[0] * (1 + cell.wobble[which].sum()) * (cell.cell_scale if which else 1.0)
    return tuple(slice(int(np.clip(np.floor((c - reach) / px - 1), 0, n)), int(np.clip(np.ceil((c + reach) / px + 1), 0, n)))
                 for c, n in zip(centre, points[0].shape))


def _territories(cells: list[Cell], points, px: float) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus ids and cell ids per pixel (both 1-based, 0 outside).

    Where nuclei overlap, the one whose boundary is relatively farther takes the pixel; where cell
    bodies meet, likewise (a weighted Voronoi border, as confluent cells abut). A nucleus always lies in
    its own cell: its pixels are that cell's, whatever the neighbours' bodies reach.
    """
    ids = []
    for which in (0, 1):
        best, owner = np.full(points[0].shape, 1.0), np.zeros(points[0].shape, np.uint16)
        for i, cell in enumerate(cells, start=1):
            box = _box(cell, which, points, px)
            reach = _reach(cell, (points[0][box], points[1][box]), which)
            closer = reach < best[box]
            best[box][closer], owner[box][closer] = reach[closer], i
        ids.append(owner)
    nucleus, cell = ids
    return nucleus, np.where(nucleus > 0, nucleus, cell)


def _density(cells: list[Cell], cell_ids: np.ndarray, points, px: float, rng) -> np.ndarray:
    """Fluorophore density: dim cytoplasm fading to the rim, bright nuclei with chromatin texture and
    darker nucleoli (overlapping nuclei add up, as in a projection), debris, out-of-focus haze and
    autofluorescence."""
    shape = cell_ids.shape
    texture = gaussian_filter(rng.standard_normal(shape), 1.5 / px)
    chromatin = gaussian_filter(rng.standard_normal(shape), 0.6 / px)
    density = np.full(shape, rng.uniform(0.015, 0.04))  # the dimmest cell rim is ~1.5x this
    for i, cell in enumerate(cells, start=1):
        box = _box(cell, 1, points, px)
        inside = cell_ids[box] == i
        rim = np.clip(_reach(cell, (points[0][box], points[1][box]), 1), 0, 1)
        density[box] += inside * cell.cytoplasm * (1.25 - 0.55 * rim) * (1 + 1.5 * texture[box])
        box = _box(cell, 0, points, px)
        where = (points[0][box], points[1][box])
        soft = np.clip((1 - _reach(cell, where, 0)) * 12, 0, 1)  # ~half a micrometre of edge
        stain = 1 + 1.2 * chromatin[box]
        for _ in range(0 if cell.mitotic else rng.integers(1, 4)):  # nucleoli: stain-poor spots
            spot = np.asarray(cell.nucleus_centre) + rng.normal(0, 0.3, 2) * cell.nucleus_axes[1]
            stain -= 0.45 * np.exp(-0.5 * (np.hypot(where[0] - spot[0], where[1] - spot[1]) / rng.uniform(0.6, 1.1)) ** 2)
        density[box] += cell.dna * soft * stain
    # debris: small and bright; cells floating out of focus: a wide, faint haze. Neither is labelled.
    for sigma, peak, most in (((0.5, 1.3), (0.5, 1.2), 5), ((8.0, 15.0), (0.03, 0.1), 3)):
        for _ in range(rng.integers(0, most)):
            spot = rng.uniform(0, 1, 2) * np.array([points[0].max(), points[1].max()])
            dist = np.hypot(points[0] - spot[0], points[1] - spot[1])
            density += rng.uniform(*peak) * np.exp(-0.5 * (dist / rng.uniform(*sigma)) ** 2)
    return np.clip(density, 0, None)


# -------------------------------------------------------------------------------------------- imaging


def _image(density: np.ndarray, px: float, rng: np.random.Generator) -> np.ndarray:
    """Camera counts of a density map: illumination, blur, shot and read noise, offset."""
    nx, ny = density.shape
    x, y = np.meshgrid(np.linspace(-1, 1, nx), np.linspace(-1, 1, ny), indexing="ij")
    cx, cy = rng.uniform(-0.6, 0.6, 2)
    fall = rng.uniform(0.2, 0.5) * ((x - cx) ** 2 + (y - cy) ** 2) / 2  # vignetting, centred off the field
    illumination = np.clip(1 - fall, 0.4, None)
    blurred = gaussian_filter(density * illumination, rng.uniform(0.4, 0.9) / px)  # focus varies a little
    photons = rng.poisson(blurred * rng.uniform(30, 250)).astype(np.float64)  # a nucleus: ~25-300 photons
    counts = 100 + photons + rng.normal(0, rng.uniform(1.5, 4.0), density.shape)
    return np.clip(np.rint(counts), 0, 65535).astype(np.uint16)


def make_field(rng_or_seed: int | np.random.Generator | np.random.SeedSequence,
               shape: tuple[int, int] = SHAPE, pixel_um: float = PIXEL_UM) -> Field:
    """One synthetic field of cells. Pure: it writes nothing; the same seed gives the same field.

    Args:
        rng_or_seed: the randomness: a seed, seed sequence or NumPy generator (which is advanced).
        shape: pixels along X and Y.
        pixel_um: pixel size in micrometres.
    """
    if len(shape) != 2 or min(shape) < 16 or not pixel_um > 0:
        raise InputError(f"a cell field needs a 2D shape of at least 16 x 16 pixels and a positive pixel size, "
                         f"got {shape} and {pixel_um} um")
    rng = np.random.default_rng(rng_or_seed)
    extent = np.asarray(shape, float) * pixel_um
    cells = _place_cells(rng, extent)
    centres = [(np.arange(n) + 0.5) * pixel_um for n in shape]
    points = tuple(np.meshgrid(*centres, indexing="ij"))
    nucleus_ids, cell_ids = _territories(cells, points, pixel_um)
    image = _image(_density(cells, cell_ids, points, pixel_um, rng), pixel_um, rng)
    labels = np.where(nucleus_ids > 0, 1, np.where(cell_ids > 0, 2, 0)).astype(np.uint8)
    instances, cells_map = _renumber(nucleus_ids, cell_ids)
    return Field(image, labels, instances, cells_map, (pixel_um / 1000.0, pixel_um / 1000.0))


def _renumber(nucleus_ids: np.ndarray, cell_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei inside the field numbered 1..n, each cell as its nucleus; cells whose nucleus lies outside
    the field (the edge cuts them) come after, n+1..."""
    nuclei = np.unique(nucleus_ids[nucleus_ids > 0])
    others = np.setdiff1d(np.unique(cell_ids[cell_ids > 0]), nuclei)
    lookup = np.zeros(max(int(cell_ids.max()), int(nucleus_ids.max())) + 1, np.uint16)
    lookup[nuclei] = np.arange(1, len(nuclei) + 1)
    lookup[others] = np.arange(len(nuclei) + 1, len(nuclei) + len(others) + 1)
    return lookup[nucleus_ids], lookup[cell_ids]


# -------------------------------------------------------------------------------------------- dataset


def sample_field(index: int, seed: int = 0) -> Field:
    """Field `index` of the sample dataset made with `seed`, the same however many fields are made."""
    return make_field(np.random.default_rng([seed, index, 20]))


def _write_2d(array: np.ndarray, spacing_mm: tuple[float, float], path: Path) -> None:
    """A 2D NIfTI (the array (X, Y), its pixel size in mm), written atomically; any integer dtype (instance ids)."""
    from medseg.io import Grid, from_array, write_sitk

    grid = Grid((*array.shape, 1), (*map(float, spacing_mm), 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_sitk(from_array(array[:, :, None], grid), path)  # one slice: written back as the 2D image


def write_cells_dataset(out: str | Path, n_train: int = 16, n_test: int = 4, seed: int = 0) -> Path:
    """Write fields in the MSD layout, 2D NIfTI; returns the dataset root `out`.

    `imagesTr/cells_000.nii.gz` ... with `labelsTr/` (nucleus 1, cell 2) and `instancesTr/` (one id per
    nucleus), then the test fields in `imagesTs/`, `labelsTs/`, `instancesTs/`, and `dataset.json`
    listing them (each entry also names its instance map). Pixels depend only on (seed, index).
    """
    if n_train < 1 or n_test < 0 or seed < 0:
        raise InputError(f"need at least 1 training field, 0 or more test fields and a seed >= 0, "
                         f"got {n_train}, {n_test} and {seed}")
    out = Path(out)
    entries: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
    for index in range(n_train + n_test):
        part, suffix = ("training", "Tr") if index < n_train else ("test", "Ts")
        name = f"cells_{index:03d}.nii.gz"
        field = sample_field(index, seed)
        for folder, array in (("images", field.image), ("labels", field.labels), ("instances", field.instances)):
            _write_2d(array, field.spacing_mm, out / f"{folder}{suffix}" / name)
        entries[part].append({"image": f"./images{suffix}/{name}", "label": f"./labels{suffix}/{name}",
                              "instances": f"./instances{suffix}/{name}"})
    dataset = {
        "name": "cells",
        "description": f"Synthetic widefield fluorescence images of cultured cells (medseg.data.phantom.cells, "
                       f"seed {seed}): nuclei and cytoplasm, nuclei also as instances",
        "reference": "medseg/data/phantom/cells.py",
        "licence": "CC0-1.0",
        "tensorImageSize": "2D",
        "modality": {"0": "fluorescence"},
        "labels": {"0": "background", **{str(k): v for k, v in LABELS.items()}},
        "pixel_size_um": PIXEL_UM,
        "numTraining": n_train,
        "numTest": n_test,
        **entries,
    }
    from medseg.io import write_text

    write_text(json.dumps(dataset, indent=2) + "\n", out / "dataset.json")
    return out
