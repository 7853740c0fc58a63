"""Speed and agreement of `medseg.evaluate.evaluate_case` against MONAI's metric functions.

A 512 x 512 x 300 pelvic case at 0.8 x 0.8 x 2.5 mm with five organ-like shapes (prostate ~40 mL,
bladder ~200 mL, a curved rectum tube, two femoral heads of 50 mm diameter); the prediction is the
reference shifted, dilated, eroded and with a noisy boundary. medseg computes every metric
(`evaluate_case`); MONAI computes Dice, HD95, ASSD and surface Dice on the full one-hot volume, as a
user would. Prints JSON and writes it to benchmarks/results/metrics.json.

    python benchmarks/bench_metrics.py [--repeats 3] [--monai-repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.evaluate.cases import evaluate_case
from medseg.io import write_text

SHAPE = (512, 512, 300)
SPACING = (0.8, 0.8, 2.5)  # mm
ORGANS = {1: "prostate", 2: "bladder", 3: "rectum", 4: "femoral_head_left", 5: "femoral_head_right"}
TOLERANCE_MM = 2.0
RESULTS = Path(__file__).resolve().parent / "results" / "metrics.json"


def _box_grid(centre_mm, half_extent_mm):
    """Voxel slices around a centre and the mm coordinates (X, Y, Z) of the voxels inside them."""
    box = tuple(slice(max(int((c - h) / s), 0), min(int((c + h) / s) + 2, n))
                for c, h, s, n in zip(centre_mm, half_extent_mm, SPACING, SHAPE))
    axes = np.meshgrid(*[np.arange(b.start, b.stop) * s for b, s in zip(box, SPACING)], indexing="ij", sparse=True)
    return box, axes


def _ellipsoid(labels, value, centre_mm, radii_mm):
    box, axes = _box_grid(centre_mm, radii_mm)
    inside = sum(((a - c) / r) ** 2 for a, c, r in zip(axes, centre_mm, radii_mm)) <= 1
    labels[box][inside] = value


def _tube(labels, value, centre_mm, radius_mm, length_mm, bend_mm):
    """A tube along z whose centre line bends in y by up to `bend_mm` (a rectum-like shape)."""
    half = (radius_mm + bend_mm, radius_mm + bend_mm, length_mm / 2)
    box, (x, y, z) = _box_grid(centre_mm, half)
    t = (z - centre_mm[2]) / (length_mm / 2)  # -1..1 along the tube
    line_y = centre_mm[1] + bend_mm * (1 - t ** 2)
    inside = ((x - centre_mm[0]) ** 2 + (y - line_y) ** 2 <= radius_mm ** 2) & (np.abs(t) <= 1)
    labels[box][inside] = value


def make_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Reference and perturbed prediction, uint8 (X, Y, Z)."""
    ref = np.zeros(SHAPE, np.uint8)
    mid = np.asarray(SHAPE) * np.asarray(SPACING) / 2  # (204.8, 204.8, 375) mm
    _ellipsoid(ref, 2, mid + (0, -10, 45), (45, 35, 30))  # bladder ~198 mL
    _ellipsoid(ref, 1, mid + (0, 0, 0), (24, 20, 20))  # prostate ~40 mL, below the bladder
    _tube(ref, 3, mid + (0, 35, 10), 15, 120, 12)  # rectum behind the prostate
    _ellipsoid(ref, 4, mid + (90, 0, 15), (25, 25, 25))  # femoral heads, 50 mm diameter
    _ellipsoid(ref, 5, mid + (-90, 0, 15), (25, 25, 25))

    rng = np.random.default_rng(seed)
    pred = np.zeros_like(ref)
    box = ndimage.find_objects(ref)
    for value in ORGANS:
        crop = tuple(slice(max(s.start - 8, 0), s.stop + 8) for s in box[value - 1])
        mask = ref[crop] == value
        if value == 1:  # prostate: shifted 3 voxels right, 1 slice up
            mask = np.roll(mask, (3, 0, 1), axis=(0, 1, 2))
        elif value == 2:  # bladder: over-segmented by 2 voxels in plane
            mask = ndimage.binary_dilation(mask, ndimage.generate_binary_structure(3, 1), iterations=2)
        elif value == 3:  # rectum: under-segmented, shifted back
            mask = np.roll(ndimage.binary_erosion(mask, iterations=1), 2, axis=1)
        # every organ: a noisy boundary (a third of the surface voxels dropped or grown outward)
        edge = mask ^ ndimage.binary_erosion(mask)
        shell = ndimage.binary_dilation(mask) & ~mask
        mask = (mask & ~(edge & (rng.random(mask.shape) < 0.33))) | (shell & (rng.random(mask.shape) < 0.33))
        pred[crop][mask & (pred[crop] == 0)] = value
    return ref, pred


def medseg_values(ref, pred) -> dict:
    rows = evaluate_case(ref, pred, SPACING, ORGANS, tolerance_mm=TOLERANCE_MM, case="bench")
    return {(r["organ"], r["metric"]): r["value"] for r in rows}


def one_hot(labels: np.ndarray):
    """(1, C, X, Y, Z) bool tensor, background first: what MONAI's metric functions take."""
    import torch

    return torch.from_numpy(np.stack([labels == c for c in range(max(ORGANS) + 1)])[None])


def monai_values(y, y_pred) -> dict:
    from monai.metrics import (compute_average_surface_distance, compute_dice, compute_hausdorff_distance,
                               compute_surface_dice)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty-class and deprecation warnings
        results = {
            "dice": compute_dice(y_pred, y, include_background=False),
            "hd95_mm": compute_hausdorff_distance(y_pred, y, percentile=95, spacing=SPACING),
            "assd_mm": compute_average_surface_distance(y_pred, y, symmetric=True, spacing=SPACING),
            "surface_dice": compute_surface_dice(y_pred, y, class_thresholds=[TOLERANCE_MM] * len(ORGANS),
                                                 spacing=SPACING),
        }
    return {(ORGANS[c + 1], metric): float(v[0, c]) for metric, v in results.items() for c in range(len(ORGANS))}


def best_of(function, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return result, min(times), times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="medseg runs; the fastest counts")
    parser.add_argument("--monai-repeats", type=int, default=1, help="MONAI runs; the fastest counts")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)

    import monai
    import scipy
    import torch

    start = time.perf_counter()
    ref, pred = make_case()
    build_s = time.perf_counter() - start
    voxel_ml = float(np.prod(SPACING)) / 1000
    counts = np.bincount(ref[ref > 0], minlength=max(ORGANS) + 1)

    ours, medseg_s, medseg_times = best_of(lambda: medseg_values(ref, pred), args.repeats)
    start = time.perf_counter()
    y, y_pred = one_hot(ref), one_hot(pred)
    one_hot_s = time.perf_counter() - start
    theirs, monai_s, monai_times = best_of(lambda: monai_values(y, y_pred), args.monai_repeats)

    differences: dict[str, float] = {}
    for key, value in theirs.items():
        metric = key[1]
        if np.isfinite(value) and np.isfinite(ours[key]):
            differences[metric] = max(differences.get(metric, 0.0), abs(ours[key] - value))
    result = {
        "command": " ".join(["python benchmarks/bench_metrics.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                    "scipy": scipy.__version__, "torch": torch.__version__, "monai": monai.__version__},
        "case": {"shape": SHAPE, "spacing_mm": SPACING, "build_s": round(build_s, 2),
                 "volume_ref_ml": {ORGANS[v]: round(float(counts[v]) * voxel_ml, 1) for v in ORGANS}},
        "medseg": {"what": "evaluate_case: all metrics (overlap, volumes, HD95, HD, ASSD, surface Dice, "
                           "pixel accuracy)", "seconds": round(medseg_s, 3), "runs": [round(t, 3) for t in medseg_times]},
        "monai": {"what": "compute_dice + compute_hausdorff_distance(percentile=95) + compute_average_surface_distance"
                          "(symmetric) + compute_surface_dice on (1, 6, 512, 512, 300) one-hot tensors",
                  "seconds": round(monai_s, 3), "runs": [round(t, 3) for t in monai_times],
                  "one_hot_seconds_not_counted": round(one_hot_s, 3)},
        "speedup": round(monai_s / medseg_s, 1),
        "max_abs_difference": {k: float(f"{v:.3g}") for k, v in differences.items()},
        "values": {organ: {metric: round(ours[organ, metric], 4) for metric in ("dice", "hd95_mm", "assd_mm", "surface_dice")}
                   for organ in ORGANS.values()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    write_text(text + "\n", args.out)
    return result


if __name__ == "__main__":
    main()
