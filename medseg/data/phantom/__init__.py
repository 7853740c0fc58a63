"""Synthetic pelvic CT phantoms with organ labels, and the bundled sample dataset made of them.

No real pelvic CT ships with medseg, so the sample data is made here. A male pelvis is built from
implicit shapes (approximate signed distances in mm, negative inside) in patient coordinates: LPS axes,
origin midway between the femoral heads. A smooth random displacement field bends it, and it is sampled
on a CT grid whose spacing, voxel axis order and world position vary from case to case.

Tissues are painted one over another with partial volume: the share of a voxel a shape covers is
estimated from its signed distance at the voxel centre and how much that distance changes across the
voxel, so 5 mm slices blur edges as a scanner does. Labels are the organ shapes at the voxel centres.
The prostate is hard on purpose, as on real CT: 32-45 HU inside 35-50 HU periprostatic tissue.
The shapes themselves are in `medseg.phantom.shapes`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from medseg.errors import InputError
from medseg.io import Grid, write_image, write_label_map, write_text
from medseg.data.phantom.pelvis import pelvis
from medseg.data.phantom.shapes import Layer

LABELS = {1: "prostate", 2: "bladder", 3: "rectum", 4: "femoral_head_left", 5: "femoral_head_right"}
ORIENTATIONS = ("RAS", "LPS", "PLI", "LIP")  # voxel axis orders; the sample dataset cycles through them
INPLANE_MM = (0.7, 1.2)  # pixel spacing range, drawn biased to coarse pixels to keep files small
SLICE_MM = (2.0, 2.5, 3.0, 5.0)  # slice spacings ...
SLICE_ODDS = (0.05, 0.1, 0.15, 0.7)  # ... and their odds: thick slices dominate, as in RT planning CT
NOISE_HU = (10.0, 30.0)  # range of the per-case noise standard deviation
_DIRECTIONS = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


# ------------------------------------------------------------------------------------- anatomy


# -------------------------------------------------------------------------------------- sampling


def _grid(code: str, spacing: tuple[float, float, float], low: np.ndarray, high: np.ndarray,
          anchor: np.ndarray) -> Grid:
    """Grid covering the patient box low..high, axes in `code` order, patient origin at world `anchor`."""
    direction, shape, origin = np.zeros((3, 3)), [], np.zeros(3)
    for axis, letter in enumerate(code):
        world, sign = _DIRECTIONS[letter]
        direction[world, axis] = sign
        shape.append(max(2, int(round((high[world] - low[world]) / spacing[axis]))))
        first = low[world] + spacing[axis] / 2 if sign > 0 else high[world] - spacing[axis] / 2
        origin[world] = round(float(anchor[world] + first), 3)
    return Grid(tuple(shape), tuple(float(s) for s in spacing), tuple(origin.tolist()),
                tuple(direction.ravel().tolist()))


def _check_orientation(code: str) -> str:
    code = str(code).upper()
    if len(code) != 3 or any(c not in _DIRECTIONS for c in code) or \
            len({_DIRECTIONS[c][0] for c in code}) != 3:
        raise InputError(f"orientation '{code}' is not an axis code such as RAS, LPS or PLI")
    return code


def make_case(rng_or_seed: int | np.random.Generator | np.random.SeedSequence,
              spacing: tuple[float, float, float] | None = None,
              orientation: str | None = None) -> tuple[np.ndarray, np.ndarray, Grid]:
    """One phantom: CT image, label map and grid. Pure: it writes nothing.

    Args:
        rng_or_seed: the randomness: a seed, seed sequence or NumPy generator (which is advanced).
        spacing: voxel size (mm) along the file's three voxel axes; by default drawn per case.
        orientation: voxel axis code such as "RAS", "LPS" or "PLI"; by default drawn per case.

    Returns:
        image: int16 HU, (X, Y, Z) in file voxel order.
        labels: uint8, (X, Y, Z); ids as in `LABELS`.
        grid: where the voxels sit (ITK/LPS world).
    """
    rng = np.random.default_rng(rng_or_seed)
    layers, low, high = pelvis(rng)
    anchor = np.array([rng.uniform(-15, 15), rng.uniform(-20, 40), rng.uniform(-650, -250)])
    pixel = round(INPLANE_MM[1] - (INPLANE_MM[1] - INPLANE_MM[0]) * rng.random() ** 4, 3)
    slice_mm = float(rng.choice(SLICE_MM, p=SLICE_ODDS))
    code = orientation if orientation is not None else ORIENTATIONS[rng.integers(len(ORIENTATIONS))]
    code = _check_orientation(code)
    if spacing is None:
        spacing = tuple(slice_mm if _DIRECTIONS[c][0] == 2 else pixel for c in code)
    elif len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"spacing {spacing} must be three positive numbers (mm)")
    grid = _grid(code, tuple(spacing), low, high, anchor)
    image, labels = _render(layers, grid, anchor, rng)
    return image, labels, grid


def _render(layers: list[Layer], grid: Grid, anchor: np.ndarray, rng: np.random.Generator):
    """Paint the layers on `grid` (bent by a smooth random field), blur, add noise; (image, labels)."""
    direction = np.reshape(grid.direction, (3, 3))
    world_axis = [int(np.argmax(np.abs(direction[:, c]))) for c in range(3)]
    # patient coordinate of each voxel along its own axis, shaped to broadcast over the volume
    lines = {}
    for c, w in enumerate(world_axis):
        steps = np.arange(grid.shape[c], dtype=np.float64) * grid.spacing[c] * direction[w, c]
        lines[w] = (grid.origin[w] - anchor[w] + steps).astype(np.float32).reshape([-1 if a == c else 1 for a in range(3)])
    # low-frequency displacement: a few plane waves, wavelengths 100-250 mm, <= 5 mm in all
    waves = 4
    amplitude = rng.normal(size=(waves, 3))
    amplitude *= rng.uniform(2, 5) / np.abs(amplitude).sum(0)
    freq = rng.normal(size=(waves, 3))
    freq *= (2 * np.pi / rng.uniform(100, 250, size=(waves, 1))) / np.linalg.norm(freq, axis=1, keepdims=True)
    phase = rng.uniform(0, 2 * np.pi, waves)
    points = [np.broadcast_to(lines[w], grid.shape).copy() for w in range(3)]
    for k in range(waves):
        wave = np.sin(sum(float(freq[k, w]) * lines[w] for w in range(3)) + float(phase[k]))
        for w in range(3):
            points[w] += float(amplitude[k, w]) * wave
    reach = float(np.abs(amplitude).sum(0).max()) + 2 * max(grid.spacing)

    in_plane = [0.0 if w == 2 else 1.0 for w in world_axis]
    texture = gaussian_filter(rng.standard_normal(grid.shape, dtype=np.float32),
                              [1.5 / s for s in grid.spacing])
    texture /= texture.std()
    image = np.full(grid.shape, -1000.0, np.float32)
    labels = np.zeros(grid.shape, np.uint8)
    for layer in layers:
        block = _block(layer.shape.bounds(), reach, lines, world_axis, grid.shape)
        if block is None:
            continue
        f = layer.shape.sd(tuple(p[block] for p in points)).astype(np.float32, copy=False)
        slope = sum(np.abs(g) for g in np.gradient(f))  # distance change across a voxel: its footprint
        cover = np.clip(0.5 - f / (slope + 1e-3), 0, 1)
        target = layer.hu + layer.texture * texture[block] if layer.texture else layer.hu
        region = image[block]
        region += cover * (target - region)
        labels[block][f < 0] = layer.label

    image = gaussian_filter(image, [0.5 * a for a in in_plane])  # scanner point spread, in-plane
    noise = gaussian_filter(rng.standard_normal(grid.shape, dtype=np.float32), [0.6 * a for a in in_plane])
    image += noise * (rng.uniform(*NOISE_HU) / noise.std())
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16), labels


def _block(bounds, reach: float, lines: dict, world_axis: list[int], shape) -> tuple[slice, ...] | None:
    """Voxel index ranges (>= 2 voxels each) that may hold a shape with these patient bounds."""
    block = []
    for c, w in enumerate(world_axis):
        coords = lines[w].ravel()
        step = float(coords[1] - coords[0]) if len(coords) > 1 else 1.0
        ends = (np.array([bounds[0][w] - reach, bounds[1][w] + reach]) - coords[0]) / step
        first = int(np.clip(np.floor(ends.min()), 0, shape[c]))
        last = int(np.clip(np.ceil(ends.max()) + 1, 0, shape[c]))
        if last <= first:
            return None
        if last - first < 2:
            first = min(first, shape[c] - 2)
            last = first + 2
        block.append(slice(first, last))
    return tuple(block)


# ------------------------------------------------------------------------------------- dataset


def sample_case(index: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, Grid]:
    """Case `index` of the sample dataset made with `seed`, the same however many cases are made."""
    return make_case(np.random.default_rng([seed, index]), orientation=ORIENTATIONS[index % len(ORIENTATIONS)])


def write_sample_dataset(out: str | Path, task: str = "prostate", n_train: int = 16, n_test: int = 4,
                         seed: int = 0) -> Path:
    """Write phantoms in the Medical Segmentation Decathlon layout; returns the dataset root `out`.

    `out/dataset.json` lists `imagesTr/case_000.nii.gz` ... with their `labelsTr/` maps, then the test
    cases in `imagesTs/` and `labelsTs/`. Voxel data depend only on (seed, case index).
    """
    if task == "cells":  # 2D fluorescence microscopy, with nucleus instances (medseg.data.phantom.cells)
        from medseg.data.phantom.cells import write_cells_dataset

        return write_cells_dataset(out, n_train, n_test, seed)
    if task != "prostate":
        raise InputError(f"no phantom for task '{task}' (available: prostate, cells)")
    if n_train < 1 or n_test < 0:
        raise InputError(f"need at least 1 training case and 0 or more test cases, got {n_train} and {n_test}")
    if seed < 0:
        raise InputError(f"seed must be 0 or more, got {seed}")
    out = Path(out)
    entries: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
    for index in range(n_train + n_test):
        part, suffix = ("training", "Tr") if index < n_train else ("test", "Ts")
        name = f"case_{index:03d}.nii.gz"
        image, labels, grid = sample_case(index, seed)
        write_image(image, grid, out / f"images{suffix}" / name)
        write_label_map(labels, grid, out / f"labels{suffix}" / name)
        entries[part].append({"image": f"./images{suffix}/{name}", "label": f"./labels{suffix}/{name}"})
    dataset = {
        "name": task,
        "description": f"Synthetic pelvic CT phantoms (medseg.phantom, seed {seed}): prostate, bladder, "
                       "rectum and femoral heads",
        "reference": "medseg/phantom.py",
        "licence": "CC0-1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", **{str(k): v for k, v in LABELS.items()}},
        "numTraining": n_train,
        "numTest": n_test,
        **entries,
    }
    write_text(json.dumps(dataset, indent=2) + "\n", out / "dataset.json")
    return out
