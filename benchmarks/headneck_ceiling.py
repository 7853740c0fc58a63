"""Where the head-and-neck Dice is lost, and how much a 3.9 mm grid leaves to win.

Three measurements on the benchmark's fixed split (`bench_headneck.split_cases`), contoured organs only:

- `--shift`: each held-out reference against itself moved by one voxel in-plane (mean over the four
  moves). A model whose every boundary is one voxel (3.9 mm) off scores this; expert contours differ by
  1-3 mm (the task file's surface tolerances), less than a voxel here.
- `--predictions NAME=FOLDER ...`: each model's held-out Dice split into the slices where both masks hold
  the organ (in-slice Dice: the boundary) and the share of voxels on slices only one mask holds (the
  extent: where the contour starts and stops, head to foot).
- `--probabilities FOLDER`: Dice against a probability threshold, from per-organ probability maps
  (`<case>_prob_<organ>.nii.gz`, e.g. a cross-validation folder's `oof/`): whether a threshold other
  than argmax's would help.

    python benchmarks/headneck_ceiling.py --shift --predictions medseg=RUN/45min/predictions \\
        plain=PLAIN/45min/masks --probabilities CV/oof --out benchmarks/results/headneck-ceiling/results.json

Prints and writes one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from medseg.evaluate.metrics import confusion, dice as dice_of_counts  # noqa: E402

THRESHOLDS = (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)


def read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    tp, fp, fn, _ = confusion(ref, pred)
    return dice_of_counts(tp, fp, fn)


def labelled(data: Path, names: list[str], meta: dict, organs: list[str]):
    """(case, organ, reference mask) for every organ a case contoured and holds."""
    entries = {Path(e["image"]).name.removesuffix(".nii.gz"): e for e in meta["training"]}
    for name in names:
        entry = entries[name]
        label = read(data / entry["label"])
        for value, organ in enumerate(organs, 1):
            if organ in entry.get("contoured", organs) and (label == value).any():
                yield name, organ, label == value


def one_voxel_shift(data: Path, names: list[str], meta: dict, organs: list[str]) -> dict:
    per_organ: dict[str, list[float]] = {o: [] for o in organs}
    for _, organ, ref in labelled(data, names, meta, organs):
        moves = [dice(np.roll(ref, step, axis), ref) for axis in (0, 1) for step in (1, -1)]
        per_organ[organ].append(float(np.mean(moves)))
    return summarise(per_organ)


def extent_split(data: Path, names: list[str], meta: dict, organs: list[str], folder: Path) -> dict:
    rows: dict[str, list[tuple[float, float, float]]] = {o: [] for o in organs}
    case, labels = None, None  # the predicted label map of the case being read (cases come in order)
    for name, organ, ref in labelled(data, names, meta, organs):
        if name != case:
            path = folder / f"{name}_seg.nii.gz"
            if not path.is_file():
                raise SystemExit(f"{path}: missing")
            case, labels = name, read(path)
        pred = labels == organs.index(organ) + 1
        both = pred.any((0, 1)) & ref.any((0, 1))  # axial slices (the third axis) holding the organ in both
        one_mask = (pred[:, :, ~both].sum() + ref[:, :, ~both].sum()) / max(1, pred.sum() + ref.sum())
        in_slice = dice(pred[:, :, both], ref[:, :, both]) if both.any() else 0.0  # missed outright: 0
        rows[organ].append((dice(pred, ref), in_slice, float(one_mask)))
    out = {}
    for key, column in (("dice", 0), ("in_slice_dice", 1), ("one_mask_slice_share", 2)):
        out[key] = summarise({o: [r[column] for r in v] for o, v in rows.items()})
    return out


def threshold_curve(data: Path, meta: dict, organs: list[str], folder: Path) -> dict:
    names = sorted({p.name.split("_prob_")[0] for p in folder.glob("*_prob_*.nii.gz")})
    curves: dict[str, list[list[float]]] = {o: [] for o in organs}
    for name, organ, ref in labelled(data, names, meta, organs):
        p = read(folder / f"{name}_prob_{organ}.nii.gz").astype(np.float32)
        p = p / 100.0 if p.max() > 1.5 else p  # maps stored as uint8 percent
        curves[organ].append([dice(p >= t, ref) for t in THRESHOLDS])
    out = {"cases": len(names), "thresholds": list(THRESHOLDS), "organs": {}}
    for organ, rows in curves.items():
        mean = np.mean(rows, 0)
        out["organs"][organ] = {"n": len(rows), "dice": [round(float(x), 4) for x in mean],
                                "best_threshold": THRESHOLDS[int(mean.argmax())],
                                "gain_over_0.5": round(float(mean.max() - mean[THRESHOLDS.index(0.5)]), 4)}
    return out


def summarise(per_organ: dict[str, list[float]]) -> dict:
    means = {o: round(float(np.mean(v)), 4) for o, v in per_organ.items() if v}
    return {"organs": means, "n": {o: len(v) for o, v in per_organ.items()},
            "mean": round(float(np.mean(list(means.values()))), 4)}


def main() -> None:
    from bench_headneck import DEFAULT_DATA, split_cases

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--shift", action="store_true", help="one-voxel in-plane shift of the references")
    parser.add_argument("--predictions", nargs="*", default=[], help="NAME=FOLDER of held-out <case>_seg.nii.gz")
    parser.add_argument("--probabilities", type=Path, help="folder of <case>_prob_<organ>.nii.gz")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    _, held_out, meta = split_cases(args.data)
    organs = [meta["labels"][k] for k in sorted(meta["labels"], key=int) if k != "0"]
    result: dict = {"command": "python benchmarks/headneck_ceiling.py " + " ".join(sys.argv[1:]),
                    "held_out_cases": len(held_out)}
    if args.shift:
        result["one_voxel_shift"] = one_voxel_shift(args.data, held_out, meta, organs)
    for item in args.predictions:
        name, _, folder = item.partition("=")
        result.setdefault("extent_split", {})[name] = extent_split(args.data, held_out, meta, organs, Path(folder))
    if args.probabilities:
        result["threshold"] = threshold_curve(args.data, meta, organs, args.probabilities)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
