"""Instances from a class mask: which voxels of 'nucleus' belong to which nucleus.

A semantic network says "nucleus here", and touching nuclei come out as one connected blob. They are
split the way the cell-segmentation literature does it (the seeded watershed of CellProfiler,
StarDist's and Cellpose's baselines): the distance from each voxel to the background peaks once per
roughly convex object, so each peak that rises clearly above the saddle joining it to a neighbour (an
h-maximum of the distance map, h a share of the expected radius) seeds one object, and a watershed of
the negated distance grows the seeds until they meet along the necks. Markers closer than a share of the
radius are one object (a bumpy outline can put two peaks in one nucleus). Distances are in mm with the
voxel spacing, so the same numbers hold in 2D (X, Y, 1) and in anisotropic 3D.

`instance_table` then describes each instance (class, size, world centroid, voxel bounding box): the
rows `medseg predict` writes as `<case>_instances.csv`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.geometry import bounding_box
from medseg.io import Grid


@dataclass(frozen=True)
class Splitting:
    """How touching objects are told apart; the defaults suit round objects such as nuclei."""

    # expected object radius (mm); None: the largest inscribed radius of the piece the median voxel of
    # the mask lies in. That is an object's radius whether the piece is one object or a clump of touching
    # ones, and dozens of specks of noise (one voxel across, but few voxels) do not pull it down
    radius_mm: float | None = None
    # a peak of the distance map seeds an object if it rises this share of the radius (and at least one
    # voxel) above the saddle to its neighbour. Two equal discs of radius r, centres d apart, meet in a
    # neck of half-width r*sqrt(1 - d^2/4r^2): 0.1 splits them down to d = 0.9 r, while an ellipse's ridge
    # falls steadily from its centre and stays one object. On the cells phantom's true nucleus masks,
    # 0.1 found 488 of 502 nuclei with no false split, 0.2 found 468 (the misses: mostly slivers cut by
    # the image's edge, merged with a neighbour)
    h_fraction: float = 0.1
    # seeds closer than this share of the radius are one object
    min_distance_fraction: float = 0.6
    # objects smaller than this share of a disc (2D) or ball (3D) of the radius are dropped from the
    # instance map (left 0; the class mask keeps them), as nuclei pipelines drop specks (Cellpose: 15 px).
    # 0.05 of a 6 um nucleus is 23 pixels at 0.5 um: on the cells test fields every false instance of a
    # trained model was 5-9 pixels, a speck of noise or debris; on true masks it costs 8 of 502 nuclei,
    # slivers the image's edge cut off
    min_size_fraction: float = 0.05


def split_instances(mask: np.ndarray, spacing: Sequence[float], options: Splitting = Splitting()) -> np.ndarray:
    """One id per object of a binary mask: touching objects separated by a seeded watershed.

    Args:
        mask: boolean (X, Y), (X, Y, 1) or (X, Y, Z).
        spacing: voxel size in mm along each axis of `mask` (a 2D mask may take three values).
        options: the expected size and how clearly objects must be separated.

    Returns:
        uint32 array of the mask's shape: 0 background (and specks below the minimum size), objects 1..n.
        A piece whose distance map has no clear peak (smaller than one voxel of rise) is one object.
    """
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    spacing = tuple(float(s) for s in spacing)[:mask.ndim]
    if len(spacing) != mask.ndim or min(spacing) <= 0:
        raise ValueError(f"spacing {spacing} must give a positive size for each of the mask's {mask.ndim} axes")
    out = np.zeros(mask.shape, np.uint32)
    box = bounding_box(mask, margin=1)
    if box is None:
        return out
    region = mask[box]
    distance = ndimage.distance_transform_edt(region, sampling=spacing)
    pieces, count = ndimage.label(region)
    radius = options.radius_mm
    if radius is None:  # voxel-weighted median of the pieces' inscribed radii
        inscribed = np.asarray(ndimage.maximum(distance, pieces, np.arange(1, count + 1)))
        sizes = np.bincount(pieces.ravel())[1:]
        order = np.argsort(inscribed)
        radius = float(inscribed[order][np.searchsorted(np.cumsum(sizes[order]), sizes.sum() / 2)])
    markers = _markers(distance, pieces, radius, spacing, options)
    out[box] = _drop_specks(_watershed(distance, markers, region, pieces), radius, spacing, options)
    return out


def _drop_specks(instances: np.ndarray, radius: float, spacing: tuple[float, ...], options: Splitting) -> np.ndarray:
    """Objects below the minimum size set to 0, the rest renumbered 1..n."""
    from skimage.segmentation import relabel_sequential

    axes = [s for s, n in zip(spacing, instances.shape) if n > 1]  # a 2D image held as (X, Y, 1) is 2D
    unit = np.pi * radius ** 2 if len(axes) <= 2 else 4 / 3 * np.pi * radius ** 3
    smallest = options.min_size_fraction * unit / float(np.prod(axes))  # voxels
    sizes = np.bincount(instances.ravel())
    small = np.flatnonzero(sizes[1:] < smallest) + 1
    if not small.size:
        return instances
    instances[np.isin(instances, small)] = 0
    return relabel_sequential(instances)[0]


def _markers(distance: np.ndarray, pieces: np.ndarray, radius: float, spacing: tuple[float, ...],
             options: Splitting) -> np.ndarray:
    """Seeds: the h-maxima of the distance map, those of one piece closer than the minimum distance merged."""
    from scipy import ndimage
    from scipy.spatial import cKDTree
    from skimage.morphology import h_maxima

    h = max(options.h_fraction * radius, min(spacing))  # at least a voxel: outline noise is not a peak
    # h_maxima compares heights exactly: on floats, a plateau one rounding error high would count, so
    # the map is quantised to a tenth of a voxel first
    step = min(spacing) / 10
    peaks = h_maxima(np.rint(distance / step).astype(np.int32), max(round(h / step), 1))
    markers, count = ndimage.label(peaks, structure=np.ones((3,) * distance.ndim))
    if count < 2:
        return markers
    centres = np.asarray(ndimage.center_of_mass(peaks, markers, np.arange(1, count + 1))) * spacing
    parent = np.arange(count + 1)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    piece = np.asarray(ndimage.maximum(pieces, markers, np.arange(1, count + 1)), int)  # each seed's piece
    for a, b in cKDTree(centres).query_pairs(options.min_distance_fraction * radius):
        if piece[a] == piece[b]:
            parent[root(a + 1)] = root(b + 1)
    return np.array([root(i) for i in range(count + 1)])[markers]


def _watershed(distance: np.ndarray, markers: np.ndarray, region: np.ndarray, pieces: np.ndarray) -> np.ndarray:
    """Grow the seeds down the distance map inside the mask; pieces without a seed become objects whole."""
    from skimage.segmentation import relabel_sequential, watershed

    grown = watershed(-distance, markers, mask=region) if markers.any() else np.zeros(region.shape, np.int64)
    unseeded = region & (grown == 0)
    grown[unseeded] = pieces[unseeded] + int(grown.max())
    return relabel_sequential(grown.astype(np.uint32))[0]


def split_classes(labels: np.ndarray, class_ids: Iterable[int], spacing: Sequence[float],
                  options: Splitting = Splitting()) -> np.ndarray:
    """Instances of several classes of a label map in one map, ids running on from class to class."""
    out = np.zeros(labels.shape, np.uint32)
    for class_id in class_ids:
        found = split_instances(labels == class_id, spacing, options)
        start = int(out.max())
        out[found > 0] = found[found > 0] + start
    return out


def instance_table(instances: np.ndarray, class_map: np.ndarray, grid: Grid,
                   names: Mapping[int, str] | None = None) -> list[dict]:
    """One row per instance: id, class, size, world centroid and voxel bounding box.

    Args:
        instances: (X, Y, Z) ids, 0 background; a 2D image is (X, Y, 1).
        class_map: (X, Y, Z) label map on the same grid; an instance's class is its most common label.
        grid: where the voxels sit; a grid one voxel deep is a 2D image.
        names: label id -> class name; the id itself where missing.

    Returns:
        Rows with `id`, `class`, `voxels`, `area_mm2` (2D) or `volume_ml` (3D), the centroid in world mm
        (ITK/LPS: `x_mm`, `y_mm`, and `z_mm` in 3D) and the first and last voxel of the box along each
        axis, both included (`i_first`, `i_last`, `j_...`, and `k_...` in 3D).
    """
    from scipy import ndimage

    instances, class_map = np.asarray(instances), np.asarray(class_map)
    if instances.shape != tuple(grid.shape) or class_map.shape != instances.shape:
        raise ValueError(f"instances {instances.shape} and classes {class_map.shape} must both have the "
                         f"grid's shape {grid.shape}")
    flat = 2 if grid.shape[2] == 1 else 3
    ids = np.flatnonzero(np.bincount(instances.ravel()))
    ids = ids[ids > 0]
    boxes = ndimage.find_objects(instances.astype(np.int64))
    centres = ndimage.center_of_mass(np.ones(instances.shape), instances, ids) if len(ids) else []
    names = dict(names or {})
    rows = []
    for index, centre in zip(ids, centres):
        box = boxes[index - 1]
        inside = instances[box] == index
        voxels = int(inside.sum())
        classes = np.bincount(class_map[box][inside].ravel().astype(np.int64))
        label = int(classes.argmax())
        world = grid.affine @ np.array([*centre, 1.0])
        row = {"id": int(index), "class": names.get(label, str(label)), "voxels": voxels}
        if flat == 2:
            row["area_mm2"] = voxels * grid.spacing[0] * grid.spacing[1]
        else:
            row["volume_ml"] = voxels * grid.voxel_volume_ml
        row.update({f"{axis}_mm": float(world[a]) for a, axis in enumerate("xyz"[:flat])})
        for a, axis in enumerate("ijk"[:flat]):
            row[f"{axis}_first"], row[f"{axis}_last"] = int(box[a].start), int(box[a].stop - 1)
        rows.append(row)
    return rows


def table_csv(rows: Sequence[dict]) -> str:
    """The rows of `instance_table` as CSV text (a header even when there is no instance)."""
    import csv
    import io

    header = list(rows[0]) if rows else ["id", "class", "voxels"]
    text = io.StringIO()
    writer = csv.DictWriter(text, header, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.10g}" if isinstance(v, float) else v for k, v in row.items()})
    return text.getvalue()


def write_instances(labels: np.ndarray, grid: Grid, task, out: Path, case: str) -> dict[str, int]:
    """`<case>_instances.nii.gz` (ids on the mask's grid; a 2D image as a 2D file) and `<case>_instances.csv`
    (`instance_table`) for the task's `instances` classes; returns the number of instances per class."""
    from medseg.io import write_image, write_text

    found = split_classes(labels, [task.label_id(name) for name in task.instances], grid.spacing)
    dtype = np.uint16 if found.max(initial=0) < 2**16 else np.uint32  # uint16: what most viewers read
    write_image(found.astype(dtype), grid, Path(out) / f"{case}_instances.nii.gz")
    rows = instance_table(found, labels, grid, task.label_names)
    write_text(table_csv(rows), Path(out) / f"{case}_instances.csv")
    return {name: sum(1 for row in rows if row["class"] == name) for name in task.instances}
