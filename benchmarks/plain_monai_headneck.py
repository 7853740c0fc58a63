"""Plain-MONAI baseline of issue 17: head-and-neck organs at risk on OpenKBP CT.

Written as an ordinary MONAI user would write it, from the MONAI tutorials (dictionary transforms,
CacheDataset, UNet, DiceCELoss, sliding_window_inference), to be run side by side with medseg by
benchmarks/bench_headneck.py. It imports nothing from medseg.

Split (fixed): the 203 cases sorted by name; the first 170 are training (the last 20 of those validate,
the other 150 train), the last 33 are held out and only predicted. Labels are trained as drawn: an organ
a case did not contour is simply background here (`contoured` is ignored).

Budget: --minutes of wall clock from the script's start (imports, caching, steps, validation all count).
At each --snapshots minute the best checkpoint so far is copied to best_at_<m>min.pt. Afterwards each
snapshot predicts the held-out cases into predictions/<m>min/<case>_seg.nii.gz on the source image's
exact grid (timed, not budgeted). log.json records steps, timings, validations and the machine.

    python benchmarks/plain_monai_headneck.py --data /work/shared/datasets/openkbp-hn --out DIR \\
        --minutes 45 --snapshots 15,30,45 --threads 1 --precision bf16 [--held-out 33] \\
        [--train-limit N] [--val-limit N] [--val-every 200] [--predict-only]
"""

import time

START = time.monotonic()  # the training budget counts from here, imports included

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import monai  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402
from monai.data import CacheDataset, DataLoader, decollate_batch  # noqa: E402
from monai.inferers import sliding_window_inference  # noqa: E402
from monai.losses import DiceCELoss  # noqa: E402
from monai.metrics import DiceMetric  # noqa: E402
from monai.networks.nets import UNet  # noqa: E402
from monai.transforms import (AsDiscrete, Compose, EnsureChannelFirstd, Invertd, LoadImaged,  # noqa: E402
                              Orientationd, RandAffined, RandCropByPosNegLabeld, RandShiftIntensityd,
                              ScaleIntensityRanged)
from monai.utils import set_determinism  # noqa: E402

ORGANS = ("brainstem", "spinal_cord", "right_parotid", "left_parotid", "esophagus", "larynx", "mandible")
N_TRAIN, N_VAL = 170, 20  # first 170 sorted names train (their last 20 validate); the rest are held out
ROI, SW_BATCH, OVERLAP = (96, 96, 64), 4, 0.25


def elapsed() -> float:
    return time.monotonic() - START  # seconds since the script started


def split(data: Path) -> tuple[list, list, list]:
    """(train, validation, held-out) case dicts of the fixed sorted-name split."""
    meta = json.loads((data / "dataset.json").read_text())
    cases = sorted(({"image": str(data / e["image"]), "label": str(data / e["label"]),
                     "name": Path(e["image"]).name.removesuffix(".nii.gz")} for e in meta["training"]),
                   key=lambda case: case["name"])
    return cases[:N_TRAIN - N_VAL], cases[N_TRAIN - N_VAL:N_TRAIN], cases[N_TRAIN:]


def base_transforms(keys: list[str]) -> list:
    """Load, channel first, RAS, CT window [-500, 500] HU -> [0, 1]; no resampling (native grid)."""
    return [LoadImaged(keys), EnsureChannelFirstd(keys), Orientationd(keys, axcodes="RAS"),
            ScaleIntensityRanged("image", a_min=-500, a_max=500, b_min=0.0, b_max=1.0, clip=True)]


def train_transforms() -> Compose:
    keys = ["image", "label"]
    return Compose(base_transforms(keys) + [
        RandCropByPosNegLabeld(keys, label_key="label", spatial_size=ROI, pos=1, neg=1, num_samples=2,
                               image_key="image", image_threshold=0),
        RandAffined(keys, prob=0.2, rotate_range=(0.1, 0.1, 0.1), scale_range=(0.1, 0.1, 0.1),
                    mode=("bilinear", "nearest")),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5)])


def make_model() -> UNet:
    return UNet(spatial_dims=3, in_channels=1, out_channels=8, channels=(16, 32, 64, 128, 256),
                strides=(2, 2, 2, 2), num_res_units=2, norm="instance")


def autocast(precision: str):
    """bf16: CPU autocast around forward (and loss); fp32: nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def infer(model, image: torch.Tensor, precision: str) -> torch.Tensor:
    with torch.no_grad(), autocast(precision):
        return sliding_window_inference(image, ROI, SW_BATCH, model, overlap=OVERLAP).float()


def validate(model, loader, precision: str) -> tuple[float, dict]:
    """Mean over organs of each organ's Dice (cases without the organ are skipped), as in the tutorials."""
    model.eval()
    metric = DiceMetric(include_background=False, reduction="mean_batch")
    to_pred, to_label = AsDiscrete(argmax=True, to_onehot=8), AsDiscrete(to_onehot=8)
    for batch in loader:
        logits = infer(model, batch["image"], precision)
        metric(y_pred=[to_pred(x) for x in decollate_batch(logits)],
               y=[to_label(y) for y in decollate_batch(batch["label"])])
    per_organ = [float(d) for d in metric.aggregate()]
    model.train()
    present = [d for d in per_organ if not math.isnan(d)]
    mean = sum(present) / len(present) if present else float("nan")
    return mean, {o: (None if math.isnan(d) else d) for o, d in zip(ORGANS, per_organ)}


class Snapshots:
    """Copies the best checkpoint so far to best_at_<m>min.pt once <m> minutes of wall clock have passed."""

    def __init__(self, minutes: list[float], out: Path):
        self.pending, self.out, self.taken = sorted(minutes), out, {}

    def take_due(self, step: int, best: dict, model, force: bool = False) -> None:
        while self.pending and (force or elapsed() >= self.pending[0] * 60):
            tag = f"{self.pending.pop(0):g}"
            path = self.out / f"best_at_{tag}min.pt"
            if best["step"] is None:  # nothing validated yet: the weights as they are
                torch.save(model.state_dict(), path)
            else:
                shutil.copyfile(self.out / "best.pt", path)
            self.taken[tag] = {"at_seconds": round(elapsed(), 1), "step": step, "best_step": best["step"],
                               "best_dice": best["dice"]}


def train(args, model, train_loader, val_loader, log: dict) -> None:
    """Steps until the wall-clock budget is spent; validates every --val-every steps if it still fits."""
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    snapshots = Snapshots(args.snapshots, args.out)
    best, step, seconds = {"dice": None, "step": None}, 0, log["seconds"]
    budget, last_validation, mark = args.minutes * 60, None, time.monotonic()
    while elapsed() < budget:
        for batch in train_loader:
            seconds["batch_preparation"] += time.monotonic() - mark
            snapshots.take_due(step, best, model)
            if elapsed() >= budget:
                break
            optimizer.zero_grad(set_to_none=True)
            with autocast(args.precision):
                loss = loss_fn(model(batch["image"]), batch["label"])
            loss.backward()
            optimizer.step()
            step += 1
            if step % args.val_every == 0:
                if last_validation is not None and elapsed() + last_validation > budget:
                    log["skipped_validations"].append(step)
                else:
                    start = time.monotonic()
                    dice, per_organ = validate(model, val_loader, args.precision)
                    last_validation = time.monotonic() - start
                    seconds["validation"] += last_validation
                    snapshots.take_due(step, best, model)  # a snapshot due mid-validation keeps the old best
                    record = {"step": step, "elapsed": round(elapsed(), 1), "loss": loss.item(),
                              "mean_dice": dice, "per_organ": per_organ}
                    log["validations"].append(record)
                    print(json.dumps(record), flush=True)
                    if best["dice"] is None or dice > best["dice"]:
                        best.update(dice=dice, step=step)
                        torch.save(model.state_dict(), args.out / "best.pt")
            mark = time.monotonic()
    seconds["train_loop"] = elapsed() - seconds["loading"] - seconds["startup"]
    seconds["steps"] = seconds["train_loop"] - seconds["validation"]
    snapshots.take_due(step, best, model, force=True)  # snapshots past the budget: the final best
    if best["step"] is None:
        torch.save(model.state_dict(), args.out / "best.pt")
    shutil.copyfile(args.out / "best.pt", args.out / "final.pt")
    log.update(steps=step, best=best, snapshots=snapshots.taken,
               seconds_per_step=seconds["steps"] / max(step, 1))


def train_stage(args, cases: tuple[list, list], log: dict) -> None:
    """Caches the training and validation volumes (timed as loading), then trains."""
    log["seconds"] = {"startup": elapsed(), "loading": 0.0, "batch_preparation": 0.0, "validation": 0.0}
    start = time.monotonic()
    train_ds = CacheDataset(cases[0], train_transforms(), cache_rate=1.0)
    val_ds = CacheDataset(cases[1], Compose(base_transforms(["image", "label"])), cache_rate=1.0)
    log["seconds"]["loading"] = time.monotonic() - start
    train_loader = DataLoader(train_ds, batch_size=1, shuffle=True, num_workers=args.workers)
    val_loader = DataLoader(val_ds, batch_size=1, num_workers=args.workers)
    log.update(validations=[], skipped_validations=[])
    train(args, make_model().train(), train_loader, val_loader, log)


def geometry(path) -> tuple:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()


def write_on_source_grid(mask: np.ndarray, source: str, path: Path) -> None:
    """Writes `mask` (in the source's voxel order) with the source's exact geometry, and checks it back."""
    size, spacing, origin, direction = geometry(source)
    image = sitk.GetImageFromArray(mask.transpose(2, 1, 0))  # numpy (i, j, k) -> SimpleITK's (k, j, i)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    if image.GetSize() != size:
        raise RuntimeError(f"{path}: size {image.GetSize()} != source {size}")
    sitk.WriteImage(image, str(path), useCompression=True)
    if geometry(path) != (size, spacing, origin, direction):
        raise RuntimeError(f"{path}: geometry differs from {source}")


def predict(args, held_out: list, log: dict) -> None:
    """Each snapshot predicts the held-out cases; Invertd undoes RAS, so masks lie on the input grid."""
    pre = Compose(base_transforms(["image"]))
    invert = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)
    model, log["prediction"] = make_model(), {}
    for minutes in args.snapshots:
        tag = f"{minutes:g}"
        model.load_state_dict(torch.load(args.out / f"best_at_{tag}min.pt", weights_only=True))
        model.eval()
        folder = args.out / "predictions" / f"{tag}min"
        folder.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        for case in held_out:
            data = pre({"image": case["image"]})
            logits = infer(model, data["image"][None], args.precision)
            data["pred"] = logits[0].argmax(0, keepdim=True)  # a MetaTensor, as Invertd wants
            mask = invert(data)["pred"][0].numpy().astype(np.uint8)
            write_on_source_grid(mask, case["image"], folder / f"{case['name']}_seg.nii.gz")
        seconds = time.monotonic() - start
        log["prediction"][tag] = {"cases": len(held_out), "seconds": seconds,
                                  "seconds_per_case": seconds / max(len(held_out), 1)}
        print(json.dumps({"snapshot": tag, **log["prediction"][tag]}), flush=True)


def machine() -> dict:
    flags = set()
    with contextlib.suppress(OSError):
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    versions = {"torch": torch.__version__, "monai": monai.__version__, "python": platform.python_version()}
    return {"cpu_flags": {f: f in flags for f in wanted}, "cpu_count": os.cpu_count(), "versions": versions}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="the openkbp-hn dataset folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=45.0, help="wall-clock budget from the script's start")
    p.add_argument("--snapshots", default="15,30,45", help="minutes at which to copy the best checkpoint")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--held-out", type=int, default=33, help="predict only the first N held-out cases")
    p.add_argument("--train-limit", type=int, default=None, help="smoke tests: the first N training cases")
    p.add_argument("--val-limit", type=int, default=None, help="smoke tests: the first N validation cases")
    p.add_argument("--val-every", type=int, default=200, help="steps between validations")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: all in this process)")
    p.add_argument("--predict-only", action="store_true", help="predict from the snapshots in --out")
    args = p.parse_args(argv)
    args.snapshots = sorted(float(m) for m in args.snapshots.split(","))
    return args


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    set_determinism(seed=0)
    train_cases, val_cases, held_out = split(args.data)
    cases = (train_cases[:args.train_limit], val_cases[:args.val_limit])
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "log.json"
    log = json.loads(log_path.read_text()) if args.predict_only and log_path.exists() else {}
    if not args.predict_only:
        log.update(threads=args.threads, precision=args.precision, minutes=args.minutes,
                   cases={"train": len(cases[0]), "validation": len(cases[1])}, **machine())
        train_stage(args, cases, log)
        log_path.write_text(json.dumps(log, indent=1))
    predict(args, held_out[:args.held_out], log)
    log_path.write_text(json.dumps(log, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
