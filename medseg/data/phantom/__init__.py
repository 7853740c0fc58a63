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
from medseg.data.phantom.shapes import (Arch, Capsule, Ellipsoid, HalfSpace, Intersect, Layer, Offset, Shape, Subtract, Tube)

LABELS = {1: "prostate", 2: "bladder", 3: "rectum", 4: "femoral_head_left", 5: "femoral_head_right"}
ORIENTATIONS = ("RAS", "LPS", "PLI", "LIP")  # voxel axis orders; the sample dataset cycles through them
INPLANE_MM = (0.7, 1.2)  # pixel spacing range, drawn biased to coarse pixels to keep files small
SLICE_MM = (2.0, 2.5, 3.0, 5.0)  # slice spacings ...
SLICE_ODDS = (0.05, 0.1, 0.15, 0.7)  # ... and their odds: thick slices dominate, as in RT planning CT
NOISE_HU = (10.0, 30.0)  # range of the per-case noise standard deviation
FOV_AP_MM = 160.0  # anterior-posterior field of view; left-right and superior-inferior fit the organs
FOV_SI_MM = (100.0, 106.0)
_DIRECTIONS = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


# ------------------------------------------------------------------------------------- anatomy


def _pelvis(rng: np.random.Generator) -> tuple[list[Layer], np.ndarray, np.ndarray]:
    """One male pelvis in patient coordinates: the layers in painting order and the box of the organs."""
    u = rng.uniform
    hu = {"fat": u(-110, -85), "muscle": u(45, 58), "peri": u(35, 50), "vessel": u(35, 50), "urine": u(0, 20),
          "wall": u(35, 45), "gas": u(-990, -900), "cortex": u(700, 1200), "marrow": u(200, 400),
          "vesicle": u(25, 40), "content": u(-40, 40) if rng.random() < 0.4 else u(10, 30)}
    hu["prostate"] = float(np.clip(hu["peri"] + u(-6, 4), 32, 45))
    cortex = u(2.0, 3.0)
    layers: list[Layer] = []

    def paint(shape: Shape, tissue: str, texture: float, label: int = 0) -> None:
        layers.append(Layer(shape, hu[tissue], texture, label))

    def bone(parts: list[Shape], label: int = 0) -> None:
        for part in parts:
            paint(part, "cortex", 40, label)
        for part in parts:
            paint(Offset(part, -cortex), "marrow", 30, label)

    # Body: subcutaneous fat, a muscle layer, fat in the pelvic cavity and the ischioanal fossae.
    body_centre, body_radii, fat = (u(-5, 5), u(10, 25), 0.0), (u(165, 190), u(100, 125)), u(12, 35)
    paint(Tube(body_centre, body_radii), "fat", 6)
    paint(Tube(body_centre, (body_radii[0] - 1.5 * fat, body_radii[1] - fat)), "muscle", 5)
    paint(Ellipsoid((0, 8, 30), (u(48, 55), u(42, 50), 75)), "fat", 6)
    for side in (-1, 1):
        paint(Ellipsoid((side * 32, 44, -42), (16, 24, 28)), "fat", 6)
        for y, reach in ((u(45, 70), u(25, 40)), (u(-60, -40), u(12, 20))):  # fat planes between muscles
            paint(Ellipsoid((side * u(85, 105), y, u(-20, 30)), (reach, u(2, 3.5), u(40, 70)),
                            tilt=(0, 0, side * u(20, 50))), "fat", 6)

    # Organ sizes and places; the femoral heads sit at +-85..95 mm, the prostate below the bladder.
    heads = {side: ((side * u(85, 92), u(-4, 4), u(-2, 2)), u(22, 25)) for side in (-1, 1)}
    prostate_c = (u(-3, 3), u(-4, 2), u(-22, -14))
    prostate_r = (u(17.5, 22.5), u(13, 17), u(14, 19))
    rectum_r, rectum_wall = (u(14, 20), u(11, 16)), u(2.5, 4.0)
    rectum = Tube((u(-4, 4), prostate_c[1] + prostate_r[1] + u(1, 3) + rectum_r[1], prostate_c[2]), rectum_r,
                  bend=(u(0.05, 0.15), u(0.0015, 0.0025)), narrow_below=prostate_c[2] - 0.6 * prostate_r[2])
    bottom = min(prostate_c[2] - prostate_r[2], min(c[2] - r for c, r in heads.values())) - 6 - u(0, 5)
    top = bottom + u(*FOV_SI_MM)
    bladder_base = prostate_c[2] + prostate_r[2] + u(0, 3)
    bladder_r = (u(30, 45), u(22, 32), min(u(20, 30), (top - 6 - bladder_base) / 2))
    bladder_c = (u(-5, 5), prostate_c[1] + u(-10, -2), bladder_base + bladder_r[2])

    paint(Ellipsoid(prostate_c, np.add(prostate_r, (9, 7, 8)), taper=0.15), "peri", 5)
    for side in (-1, 1):
        base = prostate_c[2] + prostate_r[2]
        paint(Ellipsoid((side * 17, prostate_c[1] + 0.7 * prostate_r[1], base + 5), (15, 5.5, 7),
                        tilt=(0, 0, side * 30)), "vesicle", 4)
        for shift, radius in ((0.0, 4.0), (-9.0, 5.5)):  # external iliac artery and vein
            x = side * (52 + shift)
            paint(Capsule((x, 0 + abs(shift) / 2, 90), (x + side * 20, -38, -20), radius), "vessel", 3)

    # Pelvic bones: pubic arch, acetabula, ischia, inferior pubic rami, ilia, sacrum and coccyx.
    symphysis_y = prostate_c[1] - prostate_r[1] - u(12, 18) - 8
    arch_z = prostate_c[2] + u(0, 8)
    pelvis: list[Shape] = [Arch((0, 5, arch_z), (u(55, 60), 5 - symphysis_y), (6, 13), -arch_z, back=13)]
    sacrum_y = rectum.axis_y(45) + rectum_r[1] + u(10, 16) + 12
    pelvis += [Ellipsoid((0, sacrum_y, 55), (42, 12, 35), tilt=(-25, 0, 0)),
               Capsule((0, rectum.axis_y(10) + rectum_r[1] + 16, 15),
                       (0, rectum.axis_y(-25) + rectum_r[1] + 12, -25), 7)]
    for side, (c, r) in heads.items():
        x = c[0]
        medial_up = np.array([-side * 0.75, 0.1, 0.65]) / np.linalg.norm([0.75, 0.1, 0.65])
        cup = Subtract(Ellipsoid(c, (r + 11,) * 3), Ellipsoid(c, (r + 2.5,) * 3))
        pelvis += [Intersect((cup, HalfSpace(tuple(np.subtract(c, 0.3 * r * medial_up)), tuple(-medial_up)))),
                   Capsule((x - side * 25, 10, 32), (side * 68, 30, 50), 11),
                   Capsule((x - side * 20, 28, -20), (side * 50, 44, -46), 12),
                   Capsule((side * 12, symphysis_y + 4, arch_z - 14), (side * 52, 30, -46), 6.5),
                   Ellipsoid((side * 70, 28, 55), (8, 45, 40), tilt=(0, 0, side * 34))]
    bone(pelvis)

    # Femurs: neck, greater trochanter and shaft, then the labelled head over them.
    for side, (c, r) in heads.items():
        neck = np.array([side * 0.72, -0.25, -0.65]) / np.linalg.norm([0.72, -0.25, -0.65])
        trochanter = np.add(c, 48 * neck) + (side * 10, 6, 6)
        bone([Capsule(c, tuple(np.add(c, 48 * neck)), u(13, 15)), Ellipsoid(tuple(trochanter), (16, 20, 22)),
              Capsule(tuple(trochanter - (0, 0, 20)), tuple(trochanter + (-side * 5, 5, -100)), 14)])
        bone([Ellipsoid(c, (r, r, r))], label=4 if side > 0 else 5)  # +x is the patient's left

    # Labelled organs last, so that what a label says is what the image shows.
    bladder = Ellipsoid(bladder_c, bladder_r)
    paint(bladder, "wall", 3, 2)
    paint(Offset(bladder, -u(2, 4)), "urine", 1, 2)
    paint(Ellipsoid(prostate_c, prostate_r, taper=0.18), "prostate", 8, 1)
    paint(rectum, "wall", 4, 3)
    lumen = Offset(rectum, -rectum_wall)
    paint(lumen, "content", 15, 3)
    gas_z = u(prostate_c[2], prostate_c[2] + 40)
    gas_level = rectum.axis_y(gas_z) + u(-0.3, 0.5) * rectum_r[1]  # supine: gas rises anteriorly (-y)
    pocket = Ellipsoid((rectum.centre[0], rectum.axis_y(gas_z), gas_z), (rectum_r[0], rectum_r[1] + 6, u(15, 30)))
    paint(Intersect((lumen, pocket, HalfSpace((0, gas_level, 0), (0, 1, 0)))), "gas", 0, 3)
    for _ in range(int(rng.integers(2, 12))):  # bubbles in stool or mucus
        z = u(bottom, top)
        spot = (rectum.centre[0] + u(-0.6, 0.6) * rectum_r[0], rectum.axis_y(z) + u(-0.6, 0.6) * rectum_r[1], z)
        paint(Intersect((Ellipsoid(spot, (u(1.5, 4.5),) * 3), lumen)), "gas", 0, 3)

    back = max(rectum.axis_y(z) + rectum_r[1] for z in np.linspace(bottom, top, 32)) + 6 + u(0, 8)
    reach = max(abs(c[0]) + r for c, r in heads.values()) + 6
    low = np.array([-reach - u(0, 4), back - FOV_AP_MM, bottom])
    high = np.array([reach + u(0, 4), back, top])
    return layers, low, high


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
    layers, low, high = _pelvis(rng)
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
    if task != "prostate":
        raise InputError(f"no phantom for task '{task}' (available: prostate)")
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
