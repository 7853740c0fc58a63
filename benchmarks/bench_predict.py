"""Speed and memory of `medseg predict` on a full-size pelvic CT, against the work it cannot avoid.

The scan (`make_scan`): the bundled-style phantom (`--scale` 1.45: enlarged to an adult pelvis) in a
512 x 512 x Z grid at 0.8 x 0.8 x 2.5 mm (a clinical planning CT's size), a patient in every slice,
int16 NIfTI. The model: `--model RUN_FOLDER` (a trained prostate model: realistic masks for
postprocessing and overlays), else the prostate task's default network with seeded random weights
(the forward time is the same).

Parts (each prints JSON; all of them go to benchmarks/results/predict.json):
- `e2e`: `medseg predict` stages in-process (read, preprocess, inference, resample, write, overlays)
  against the bare forward passes of the windows it runs (same batch, same model): the ratio says how
  much of the time is medseg's own overhead (target <= 1.2). After a first (cold) run, `--repeats`
  warm runs alternate with bare passes, and the run with the median ratio is reported, every ratio
  beside it. Also against the forward passes of every window of the whole volume (what a plain
  sliding window runs), and the same scan without the body crop (voxels that differ).
- `stitching`: the inference step alone (on the preprocessed volume) for medseg, plain MONAI
  `sliding_window_inference` (its defaults: sw_batch_size 1) and TorchIO `GridSampler` +
  `GridAggregator`, same model, volume, window and overlap.
- `memory`: a `medseg predict` subprocess on a 512 x 512 x 300 scan: wall time and peak RSS
  (targets: <= 60 s, < 2 GB).
- `crop` (needs `--model`): windows over the body only vs the whole volume, Dice on the sample test
  cases (allowed change: 0.005).
- `resample` (needs `--model`): the two ways back to the input grid measured against the sample test
  references: trilinear probabilities then argmax (medseg's way) vs argmax on the model grid then
  nearest neighbour.

    python benchmarks/bench_predict.py [e2e stitching memory crop resample] [--slices 200] [--model RUN_FOLDER]
                                       [--device cuda]   (e2e and stitching; results under e2e_cuda, stitching_cuda)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
SPACING = (0.8, 0.8, 2.5)


def make_scan(path: Path, slices: int, labels_path: Path | None = None, scale: float = 1.0) -> Path:
    """A 512 x 512 x `slices` int16 CT (0.8 x 0.8 x 2.5 mm, LPS) with a patient in every slice.

    The bundled-style phantom (239 x 160 x 105 mm) is placed in the 410 mm field of view, and its
    slices are repeated head to foot and back (mirrored) to fill all `slices`, so the body covers the
    scan from top to bottom as on a real planning CT. `scale` enlarges it in-plane: 1.45 makes an
    adult pelvis's 347 x 232 mm, but anatomy larger than the sample-trained model ever saw, whose
    noisy masks inflate the postprocessing and overlay times. `labels_path` also writes its labels.
    """
    from scipy import ndimage

    from medseg.io import Grid, write_image, write_label_map
    from medseg.data.phantom import make_case

    image, labels, _ = make_case(3, spacing=SPACING, orientation="LPS")  # (299, 200, 42)
    period = np.r_[np.arange(image.shape[2]), np.arange(image.shape[2])[::-1]]
    index = period[np.arange(slices) % len(period)]
    body = np.full((512, 512, slices), -1000, np.int16)
    mask = np.zeros((512, 512, slices), np.uint8)
    for source, target, order in ((image, body, 1), (labels, mask, 0)):
        plane = [ndimage.zoom(source[:, :, k], scale, order=order, prefilter=False) if scale != 1 else source[:, :, k]
                 for k in range(source.shape[2])]
        nx, ny = plane[0].shape
        x0, y0 = (512 - nx) // 2, (512 - ny) // 2
        for z, k in enumerate(index):
            target[x0:x0 + nx, y0:y0 + ny, z] = plane[k]
    origin = -(np.asarray(body.shape) - 1) / 2 * np.asarray(SPACING)
    grid = Grid(body.shape, SPACING, tuple(origin.tolist()), tuple(np.eye(3).ravel().tolist()))
    if labels_path is not None:
        write_label_map(mask, grid, labels_path)
    return write_image(body, grid, path)


def make_model_folder(folder: Path) -> Path:
    """A model folder as `medseg train` writes it, with the default prostate network, seeded weights."""
    import torch

    from medseg.config import load_task, task_to_dict
    from medseg.model.networks import build_network, plan_network
    from medseg.data.preprocess import ChannelIntensity, Preprocessing
    from medseg.model.folder import save_checkpoint

    task = load_task("prostate")
    prep = Preprocessing(task.spacing, "dataset", (ChannelIntensity(task.intensity.window, 40.0, 60.0),))
    plan = plan_network(task.network, 1, task.num_classes, task.patch_size, prep.spacing)
    torch.manual_seed(0)
    network = build_network(plan)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"task": task_to_dict(task), "preprocessing": prep.to_dict(), "network": plan.to_dict()}
    (folder / "config.json").write_text(json.dumps(config))
    save_checkpoint(folder / "best.pt", {"model": network.state_dict()})
    return folder


def window_count(shape, roi, overlap) -> int:
    from monai.inferers.utils import _get_scan_interval, dense_patch_slices

    padded = tuple(max(s, r) for s, r in zip(shape, roi))  # MONAI pads a volume smaller than the window
    interval = _get_scan_interval(padded, tuple(roi), 3, (overlap,) * 3)
    return len(dense_patch_slices(padded, tuple(roi), interval))


def bare_forward_seconds(network, windows: int, batch: int, roi) -> float:
    """The forward passes sliding-window inference must run: `windows` windows in batches of `batch`."""
    import torch

    from medseg.infer.predictor import autocast

    # an OpenVINO network (`--backend openvino`, medseg.infer.backends) has no parameters and runs on the CPU
    device = next(network.parameters()).device if isinstance(network, torch.nn.Module) else torch.device("cpu")
    data = torch.randn(batch, 1, *roi, device=device)
    with torch.inference_mode(), autocast(device):
        if device.type == "cuda":  # cuDNN picks its kernels on the first batch
            network(data)
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for first in range(0, windows, batch):
            network(data[: min(batch, windows - first)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_e2e(scan: Path, model: Path, out: Path, scale: float, device: str = "cpu", repeats: int = 3) -> dict:
    from dataclasses import replace

    from medseg.infer.predictor import Predictor
    from medseg.io import read_image
    from medseg.infer.batch import PredictOptions, write_outputs
    from medseg.data.preprocess import to_model_grid
    from medseg.runtime import keep_freed_memory

    keep_freed_memory()  # as `medseg predict` does at start-up
    predictor = Predictor(model, device=device)
    options = PredictOptions(model=model, device=device)

    def run() -> tuple[float, dict, object, tuple]:
        start = time.perf_counter()
        image = read_image(scan, dtype=None)
        read_s = time.perf_counter() - start
        seg = predictor.predict(image)
        seg.seconds["read"] = read_s
        row = write_outputs(seg, image, "scan", out, predictor.task, options, None)
        return time.perf_counter() - start, row["seconds"], seg, image

    # The first run also pays for oneDNN building its kernels for each new input shape, once per
    # process; the bare forward passes run warm, so the ratio compares warm runs. On a shared 2-core
    # machine the same forward passes vary by +-10 % from one minute to the next, so warm runs and bare
    # passes alternate `repeats` times and the ratio is the median of each run over the bare passes
    # next to it.
    total_cold, stages_cold, _, image = run()
    volume, grid = to_model_grid(image[0], image[1], predictor.bundle.preprocessing.spacing)
    box = predictor.body_box(volume[0])
    roi, settings = predictor.bundle.plan.patch_size, predictor.task.inference
    windows = window_count([b.stop - b.start for b in box], roi, predictor.overlap)
    whole = window_count(grid.shape, roi, predictor.overlap)
    runs, bares = [], []
    for _ in range(repeats):
        runs.append(run())
        bares.append(bare_forward_seconds(predictor.bundle.network, windows, settings.sw_batch_size, roi))
    ratios = [r[0] / b for r, b in zip(runs, bares)]
    middle = int(np.argsort(ratios)[len(ratios) // 2])
    total, stages, seg, image = runs[middle]
    bare = bares[middle]
    result = {
        "scan": {"shape": list(image[0].shape[1:]), "spacing_mm": list(SPACING), "anatomy_scale": scale},
        "device": str(predictor.bundle.device), "precision": predictor.bundle.precision,
        "model": "trained" if (model / "metrics.csv").is_file() else "seeded random weights",
        "model_grid": list(grid.shape), "body_box": [[b.start, b.stop] for b in box],
        "windows": windows, "windows_whole_volume": whole, "roi": list(roi), "overlap": predictor.overlap,
        "sw_batch_size": settings.sw_batch_size, "repeats": repeats,
        "stages_s": stages, "total_s": round(total, 2),  # the run with the median ratio
        "first_run": {"stages_s": stages_cold, "total_s": round(total_cold, 2)},
        "bare_forward_s": round(bare, 2),
        "inference_over_bare_forward": round(stages["inference"] / bare, 3),
        "total_over_bare_forward": round(ratios[middle], 3),
        "total_over_bare_forward_each_run": [round(r, 3) for r in ratios],
        "total_s_each_run": [round(r[0], 2) for r in runs], "bare_forward_s_each_run": [round(b, 2) for b in bares],
        "first_run_total_over_bare_forward": round(total_cold / bare, 3),
        # A plain sliding window runs every window of the volume; per-window time is the same.
        "bare_forward_whole_volume_s": round(bare * whole / windows, 2),
        "total_over_bare_forward_whole_volume": round(total / (bare * whole / windows), 3),
    }
    uncropped = replace(predictor.task, inference=replace(predictor.task.inference, crop_to_body=False))
    predictor.bundle.task = uncropped
    seg_whole = predictor.predict(image)
    result["uncropped_stages_s"] = {k: round(v, 2) for k, v in seg_whole.seconds.items()}
    result["uncropped_voxels_differing"] = int((seg_whole.labels != seg.labels).sum())
    return result


def bench_stitching(scan: Path, model: Path, repeats: int, device: str = "cpu") -> dict:
    import torch
    import torchio as tio
    from monai.inferers import sliding_window_inference

    from medseg.infer.predictor import Predictor
    from medseg.io import read_image
    from medseg.data.preprocess import preprocess

    predictor = Predictor(model, device=device)
    network = predictor.bundle.network
    volume = preprocess(predictor.bundle.preprocessing, *read_image(scan))["image"].data  # (1, X, Y, Z)
    on_device = volume.to(predictor.bundle.device)

    def finish(tensor):  # the others' results come back to the CPU, as medseg's do
        return tensor.float().cpu()
    roi, overlap = predictor.bundle.plan.patch_size, predictor.overlap
    batch = predictor.task.inference.sw_batch_size

    def medseg_way():
        return predictor.logits(volume)

    def monai_default():
        with torch.inference_mode():
            return finish(sliding_window_inference(on_device[None], roi, 1, network, overlap=overlap,
                                                   mode="gaussian")[0])

    def monai_batched():
        with torch.inference_mode():
            return finish(sliding_window_inference(on_device[None], roi, batch, network, overlap=overlap,
                                                   mode="gaussian")[0])

    def torchio_grid():
        padding = [p for r, n in zip(roi, volume.shape[1:]) for p in (0, max(0, r - n))]
        subject = tio.Subject(image=tio.ScalarImage(tensor=torch.nn.functional.pad(volume, padding[::-1],
                                                                                    mode="replicate")))
        overlap_voxels = [int(r * overlap) // 2 * 2 for r in roi]
        sampler = tio.inference.GridSampler(subject, roi, overlap_voxels, padding_mode="edge")
        aggregator = tio.inference.GridAggregator(sampler, overlap_mode="hann")
        loader = torch.utils.data.DataLoader(sampler, batch_size=batch)
        with torch.inference_mode():
            for patches in loader:
                logits = network(patches["image"][tio.DATA].to(on_device.device))
                aggregator.add_batch(logits.float().cpu(), patches[tio.LOCATION])
        return aggregator.get_output_tensor()[(slice(None), *(slice(0, n) for n in volume.shape[1:]))]

    ways = {"medseg": medseg_way, "monai_default_sw_batch_1": monai_default,
            f"monai_sw_batch_{batch}": monai_batched, f"torchio_grid_batch_{batch}": torchio_grid}
    times: dict[str, list[float]] = {name: [] for name in ways}
    outputs = {}
    for _ in range(repeats):  # interleaved, so load on the machine hits every variant alike
        for name, run in ways.items():
            start = time.perf_counter()
            outputs[name] = run()
            times[name].append(time.perf_counter() - start)
    median = {name: round(float(np.median(t)), 2) for name, t in times.items()}
    reference = outputs["monai_default_sw_batch_1"].float()
    return {
        "model_grid": list(volume.shape[1:]), "roi": list(roi), "overlap": overlap, "repeats": repeats,
        "seconds_median": median,
        "medseg_speedup_vs": {name: round(median[name] / median["medseg"], 2) for name in ways if name != "medseg"},
        "max_abs_logit_difference_vs_monai_default": {
            name: round(float((out.float() - reference).abs().max()), 6) for name, out in outputs.items()
            if out.shape == reference.shape},
    }


def bench_memory(model: Path, slices: int, folder: Path, scale: float) -> dict:
    """`medseg predict` as a user runs it (a fresh process: start-up, model, read, ..., overlays).

    The peak is the child's own (`os.wait4`). Linux counts a spawned child's memory from before its
    exec too, which is this process's: run this part while this process is small, before the others.
    """
    scan = make_scan(folder / f"scan_{slices}.nii.gz", slices, scale=scale)
    command = [sys.executable, "-m", "medseg", "predict", str(scan), "-m", str(model), "-o", str(folder / "mem_out"),
               "--device", "cpu"]
    parent_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"medseg predict failed: {child.stderr.read().decode()[-2000:]}")
    volumes = json.loads((folder / "mem_out" / f"scan_{slices}_volumes.json").read_text())
    return {"scan_shape": [512, 512, slices], "command": "medseg predict SCAN -m MODEL -o OUT --device cpu",
            "model": "trained" if (model / "metrics.csv").is_file() else "seeded random weights",
            "wall_s": round(wall, 1), "stages_s": volumes["seconds"],
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "this_process_peak_mb_at_spawn": round(parent_mb)}


def in_air(image, reference, field_mm: float = 410.0):
    """The scan (and its labels) inside a `field_mm` square field of view of air, as a real CT has it.

    The sample phantoms are cut close to the body, so cropping to the body would change nothing on
    them; a planning CT's 512 x 512 field of view leaves air all around the patient.
    """
    from medseg.io import Grid

    array, grid = image
    direction = np.reshape(grid.direction, (3, 3))
    pad = [0, 0, 0]
    for axis in range(3):
        if np.argmax(np.abs(direction[:, axis])) < 2:  # an in-plane (left-right or front-back) axis
            pad[axis] = max(0, int(round((field_mm - grid.shape[axis] * grid.spacing[axis]) / grid.spacing[axis] / 2)))
    widths = [(0, 0)] + [(p, p) for p in pad]
    array = np.pad(array, widths, constant_values=-1000)
    reference = np.pad(reference, widths[1:])
    origin = grid.affine @ np.r_[-np.asarray(pad, float), 1.0]
    return (array, Grid(array.shape[1:], grid.spacing, tuple(origin[:3].tolist()), grid.direction)), reference


def bench_crop(model: Path) -> dict:
    """Windows over the body only vs the whole volume: Dice on the sample test cases placed in a 410 mm
    field of view of air (`in_air`), and the inference time of each."""
    from dataclasses import replace

    from medseg.config import sample_data_dir
    from medseg.infer.predictor import Predictor
    from medseg.io import read_image, read_label
    from medseg.evaluate.metrics import confusion, dice

    data = sample_data_dir("prostate")
    predictor = Predictor(model, device="cpu")
    tasks = {"body_crop": predictor.task,
             "whole_volume": replace(predictor.task, inference=replace(predictor.task.inference, crop_to_body=False))}
    scores: dict[str, dict[str, list[float]]] = {way: {} for way in tasks}
    seconds = dict.fromkeys(tasks, 0.0)
    for image_path in sorted((data / "imagesTs").glob("*.nii.gz")):
        image = read_image(image_path, dtype=None)
        reference, _ = read_label(data / "labelsTs" / image_path.name)
        image, reference = in_air(image, reference)
        for way, task in tasks.items():
            predictor.bundle.task = task
            seg = predictor.predict(image)
            seconds[way] += seg.seconds["inference"]
            for label_id, organ in task.label_names.items():
                scores[way].setdefault(organ, []).append(dice(*confusion(reference == label_id, seg.labels == label_id)[:3]))
    result = {way: {"mean_dice": round(float(np.mean([np.mean(v) for v in organs.values()])), 4),
                    "dice": {o: round(float(np.mean(v)), 4) for o, v in organs.items()},
                    "inference_s": round(seconds[way], 2)} for way, organs in scores.items()}
    result["max_abs_dice_change"] = round(max(abs(a - b) for organ in scores["body_crop"]
                                              for a, b in zip(scores["body_crop"][organ], scores["whole_volume"][organ])), 4)
    return result


def bench_resample(model: Path) -> dict:
    """Dice of both ways back to the input grid, on the sample test cases."""
    import torch

    from medseg.config import sample_data_dir
    from medseg.infer.predictor import Predictor
    from medseg.io import read_image, read_label
    from medseg.evaluate.metrics import confusion, dice
    from medseg.data.preprocess import preprocess

    data = sample_data_dir("prostate")
    predictor = Predictor(model, device="cpu")
    scores: dict[str, dict[str, list[float]]] = {"probabilities_trilinear": {}, "argmax_nearest": {}}
    seconds = {"probabilities_trilinear": 0.0, "argmax_nearest": 0.0}
    for image_path in sorted((data / "imagesTs").glob("*.nii.gz")):
        image = read_image(image_path)
        reference, _ = read_label(data / "labelsTs" / image_path.name)
        subject = preprocess(predictor.bundle.preprocessing, *image)
        probabilities = torch.softmax(predictor.logits(subject["image"].data), 0)
        from medseg.infer.resample import resample_probabilities

        start = time.perf_counter()
        smooth, _ = resample_probabilities(probabilities, subject["image"].affine, image[1])
        seconds["probabilities_trilinear"] += time.perf_counter() - start
        start = time.perf_counter()
        onehot = torch.nn.functional.one_hot(probabilities.argmax(0), probabilities.shape[0]).permute(3, 0, 1, 2)
        nearest = nearest_labels(onehot.float(), subject["image"].affine, image[1])
        seconds["argmax_nearest"] += time.perf_counter() - start
        for way, labels in (("probabilities_trilinear", smooth), ("argmax_nearest", nearest)):
            for label_id, organ in predictor.task.label_names.items():
                tp, fp, fn, _ = confusion(reference == label_id, labels == label_id)
                scores[way].setdefault(organ, []).append(dice(tp, fp, fn))
    return {way: {"mean_dice": round(float(np.mean([np.mean(v) for v in organs.values()])), 4),
                  "dice": {o: round(float(np.mean(v)), 4) for o, v in organs.items()},
                  "seconds": round(seconds[way], 2)} for way, organs in scores.items()}


def nearest_labels(onehot, source_affine, grid):
    """Argmax on the model grid carried back by nearest neighbour (one-hot resampled, then argmax)."""
    import SimpleITK as sitk

    from medseg.io import Grid, from_array, to_array

    labels = onehot.argmax(0).numpy().astype(np.uint8)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ source_affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    model_grid = Grid(labels.shape, tuple(spacing.tolist()), tuple(lps[:3, 3].tolist()),
                      tuple((lps[:3, :3] / spacing).ravel().tolist()))
    reference = grid.apply_to(sitk.Image(list(grid.shape), sitk.sitkUInt8))
    out = sitk.Resample(from_array(labels, model_grid), reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return to_array(out)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", default=["e2e", "stitching", "memory"])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--memory-slices", type=int, default=300)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="in-plane size of the anatomy (1.45: an adult pelvis, larger than the sample data's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where e2e and stitching run the network")
    parser.add_argument("--model", type=Path, help="trained run folder (needed by `resample` and `crop`; "
                                                   "e2e and memory use it too, else seeded random weights)")
    args = parser.parse_args()
    result: dict = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                                "torch": torch.__version__, "threads": torch.get_num_threads(),
                                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
                    "command": "python benchmarks/bench_predict.py " + " ".join(sys.argv[1:])}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or make_model_folder(tmp / "model")
        if "memory" in args.parts:  # first, while this process is small (see bench_memory)
            result["memory"] = bench_memory(model, args.memory_slices, tmp, args.scale)
        if {"e2e", "stitching"} & set(args.parts):
            scan = make_scan(tmp / "scan.nii.gz", args.slices, scale=args.scale)
        if "e2e" in args.parts:
            result["e2e"] = bench_e2e(scan, model, tmp / "out", args.scale, args.device, args.repeats)
            print(json.dumps(result["e2e"]), flush=True)
        if "stitching" in args.parts:
            result["stitching"] = bench_stitching(scan, model, args.repeats, args.device)
            print(json.dumps(result["stitching"]), flush=True)
        if "crop" in args.parts:
            if not args.model:
                parser.error("crop needs --model RUN_FOLDER (a trained model)")
            result["crop"] = bench_crop(args.model)
        if "resample" in args.parts:
            if not args.model:
                parser.error("resample needs --model RUN_FOLDER (a trained model)")
            result["resample"] = bench_resample(args.model)
    text = json.dumps(result, indent=2)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "predict.json"  # parts run separately accumulate in one file
    merged = json.loads(path.read_text()) if path.is_file() else {}
    for part in args.parts:
        key = part if args.scale == 1 or part not in ("e2e", "memory") else f"{part}_scale_{args.scale:g}"
        key += "" if args.device == "cpu" or part not in ("e2e", "stitching") else f"_{args.device.replace(':', '')}"
        merged[key] = {**result[part], "command": result["command"], "machine": result["machine"]}
    path.write_text(json.dumps(merged, indent=2) + "\n")


if __name__ == "__main__":
    main()
