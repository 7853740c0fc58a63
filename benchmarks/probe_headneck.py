"""Does a head-and-neck training start to learn? Training-patch Dice per organ over a few hundred steps.

A short, cheap check (~10 min for 500 steps on 2 cores) of optimiser and loss choices, before a
60-minute `bench_headneck.py` run: medseg's own pipeline (`load_subject`, `patch_batches`,
`build_network`, `make_loss`, `train_step`) on the first `--cases` training cases of the benchmark's
split, seeded. Every 10 steps the batch just trained on is predicted (eval mode) and its Dice per organ
accumulated over the cases that contoured the organ; every 50 steps one JSON line is printed.

    python benchmarks/probe_headneck.py [--optimizer adamw] [--lr 1e-3] [--steps 500] [--cases 60]
                                        [--only-contouring esophagus]

The figures quoted in docs/headneck.md came from an earlier form of this probe. That form took its 60
cases and its preprocessing (fingerprint of 165 cases) from the 60-minute run's folder; this script
takes the benchmark split's first cases and their own fingerprint, so its figures can differ a little.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    from bench_headneck import DEFAULT_DATA, split_cases

    from medseg.config import load_task
    from medseg.data.datasets import load_dataset
    from medseg.data.fingerprint import compute_fingerprint
    from medseg.model.networks import build_network, plan_network
    from medseg.data.partial import CONTOURED
    from medseg.data.preprocess import resolve_preprocessing
    from medseg.runtime import autocast, keep_freed_memory
    from medseg.data.patches import load_subject, patch_batches
    from medseg.train.steps import make_loss, make_optimizer, train_step

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--only-contouring", metavar="ORGAN", help="use only training cases that contour ORGAN")
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "out" / "probe_cache")
    args = parser.parse_args()

    keep_freed_memory()
    torch.manual_seed(0)
    np.random.seed(0)
    task = load_task("headneck")
    task = dataclasses.replace(task, optimizer=dataclasses.replace(task.optimizer, name=args.optimizer, lr=args.lr))
    cases = {case.name: case for case in load_dataset(args.data)}
    train, _, _ = split_cases(args.data)
    names = [n for n in train if not args.only_contouring or args.only_contouring in (cases[n].contoured or ())]
    names = names[: args.cases]
    prep = resolve_preprocessing(task, compute_fingerprint([cases[n] for n in names], task))
    plan = plan_network(task.network, 1, task.num_classes, task.patch_size, prep.spacing)
    cache = args.cache / f"{len(names)}_{args.only_contouring or 'all'}"  # normalisation follows the case set
    cache.mkdir(parents=True, exist_ok=True)
    subjects = [load_subject(cases[n], prep, task, cache) for n in names]
    device = torch.device("cpu")
    network = build_network(plan)
    optimizer = make_optimizer(task, network)
    loss_fn = make_loss(task, plan)
    batches = patch_batches(subjects, task, device)
    organs = task.label_names
    overlap, total, losses = np.zeros(task.num_classes), np.zeros(task.num_classes), []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = next(batches)
        losses.append(train_step(network, batch, loss_fn, optimizer, task, device))
        if step % 10 == 0:
            network.eval()
            with torch.inference_mode(), autocast(device):
                output = network(batch["image"]).float()
            network.train()
            predicted, target = output.argmax(1), batch["label"][:, 0].long()
            for case, contoured in enumerate(batch[CONTOURED]):
                for label in organs:
                    if contoured[label]:
                        p, t = predicted[case] == label, target[case] == label
                        overlap[label] += 2 * int((p & t).sum())
                        total[label] += int(p.sum() + t.sum())
        if step % 50 == 0:
            dice = {name: round(float(overlap[i] / total[i]), 3) if total[i] else None for i, name in organs.items()}
            print(json.dumps({"step": step, "loss": round(float(np.mean(losses[-50:])), 4), "training_patch_dice": dice,
                              "seconds": round(time.perf_counter() - start, 1), "optimizer": args.optimizer,
                              "lr": args.lr, "cases": len(names)}), flush=True)
            overlap[:], total[:] = 0, 0


if __name__ == "__main__":
    main()
