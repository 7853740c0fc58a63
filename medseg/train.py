"""Training: TorchIO patch queues feeding a MONAI network, as a few plain functions.

`fit` prepares a run folder that describes itself (config.json: task, spacing, normalisation, network),
preprocesses every case once (cached in the run folder), then alternates `train_one_epoch` and
`validate` (full-volume sliding windows, the code `medseg predict` uses) and keeps `best.pt` and
`last.pt`. The learning-rate schedule runs on progress = max(steps done / steps planned, time used /
time budget), so a `--max-minutes` budget still ends with a fully decayed learning rate.

Under torchrun (a `World` of several processes) the same functions train with DistributedDataParallel:
rank 0 opens the run folder and alone writes config, checkpoints, metrics, curve, TensorBoard and log;
each rank preprocesses, caches and samples only its share of the training cases (case i to rank
i % size), with its own random stream, while DDP keeps the weights identical by starting every rank
from rank 0's and averaging gradients. Validation is sharded the same way and its per-case Dice
gathered, so every rank computes the same scores. Step times are agreed (the slowest rank's), so
every rank takes the same `--max-minutes` decisions and none is left waiting in a collective.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torchio as tio

from medseg import __version__
from medseg.config import Task, load_task, parse_task, sample_data_dir, task_to_dict
from medseg.datasets import load_dataset
from medseg.fingerprint import compute_fingerprint
from medseg.distributed import World
from medseg.errors import InputError
from medseg.infer import CONFIG_NAME, resolve_device, sliding_window_logits
from medseg.io import write_text
from medseg.networks import NetworkPlan, build_network, plan_network
from medseg.partial import CONTOURED
from medseg.preprocess import Preprocessing, resolve_preprocessing
from medseg.runfolder import (MetricsTable, TensorBoard, load_checkpoint, make_logger, rng_state, save_checkpoint,
                              set_rng_state, silent_logger)
from medseg.runtime import autocast, prepare_network, resolve_precision
from medseg.sample import load_subject, make_split, patch_batches


@dataclass(frozen=True)
class TrainOptions:
    """Runtime choices of one training run (everything else comes from the task file)."""

    task: str | Path = "prostate"  # task name or file
    data: Path | None = None  # dataset folder; None: the task's bundled sample data
    out: Path | None = None  # run folder; None: runs/<task>/<timestamp>
    epochs: int | None = None  # override the task's schedule
    max_minutes: float | None = None  # override the task's time budget
    device: str = "auto"
    seed: int = 0
    folds: int = 5
    fold: int = 0
    resume: bool = False
    compile: bool = False
    precision: str = "auto"  # auto: bf16 autocast where the CPU/GPU runs bf16 natively (medseg.runtime)


# ------------------------------------------------------------------------------- the optimiser


def make_optimizer(task: Task, network: torch.nn.Module) -> torch.optim.Optimizer:
    settings = task.optimizer
    if settings.name == "sgd":
        return torch.optim.SGD(network.parameters(), lr=settings.lr, momentum=settings.momentum, nesterov=True,
                               weight_decay=settings.weight_decay)
    return torch.optim.AdamW(network.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)


def learning_rate(task: Task, progress: float) -> float:
    """Poly (nnU-Net) or cosine decay from the task's lr to 0 as progress goes 0 -> 1."""
    progress = min(max(progress, 0.0), 1.0)
    if task.schedule.lr_schedule == "poly":
        return task.optimizer.lr * (1.0 - progress) ** task.schedule.poly_exponent
    return task.optimizer.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_loss(task: Task, plan: NetworkPlan):
    """DiceCE that skips each case's uncontoured organs: `loss(output, target, contoured)`."""
    from medseg.losses import build_loss

    return build_loss(task, plan.deep_supervision)


# ----------------------------------------------------------------------------------- the loops


@dataclass
class Progress:
    """Where a run stands; stored in last.pt so a resumed run continues the same schedule."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimisation steps completed
    seconds: float = 0.0  # training seconds used (excluding set-up)
    best_dice: float = -1.0

    def fraction(self, total_steps: int, budget_seconds: float | None) -> float:
        by_time = self.seconds / budget_seconds if budget_seconds else 0.0
        return max(self.step / total_steps, by_time)


def train_step(network, batch: dict, loss_fn, optimizer, task: Task, device: torch.device,
               precision: str = "auto") -> float:
    """One optimisation step on a batch from `patch_batches`; returns the loss."""
    image = batch["image"].to(device, non_blocking=True)
    target = batch["label"].to(device, non_blocking=True)
    contoured = batch[CONTOURED].to(device) if CONTOURED in batch else None
    with autocast(device, precision):
        output = network(image).float()  # loss in fp32: CPU autocast would leave softmax in bf16
        heads = list(torch.unbind(output, 1)) if output.dim() == 6 else output
        loss = loss_fn(heads, target, contoured)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(network.parameters(), task.schedule.grad_clip)
    optimizer.step()
    return float(loss.detach())


def train_one_epoch(network, batches, loss_fn, optimizer, task: Task, progress: Progress, total_steps: int,
                    budget: float | None, device: torch.device, show_bar: bool,
                    world: World = World(), precision: str = "auto") -> float:
    """Run up to `steps_per_epoch` steps (fewer if the budget runs out); returns this rank's mean loss.

    Each step's time is the slowest rank's, so that all ranks agree on when the budget is spent.
    """
    from tqdm import tqdm

    network.train()
    losses = []
    bar = tqdm(total=task.schedule.steps_per_epoch, desc=f"epoch {progress.epoch + 1}", unit="step", leave=False,
               disable=not show_bar, dynamic_ncols=True)
    for _ in range(task.schedule.steps_per_epoch):
        if progress.fraction(total_steps, budget) >= 1.0:
            break
        start = time.perf_counter()
        batch = next(batches)
        lr = learning_rate(task, progress.fraction(total_steps, budget))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = train_step(network, batch, loss_fn, optimizer, task, device, precision)
        losses.append(loss)
        progress.step += 1
        progress.seconds += world.max(time.perf_counter() - start)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.2g}",
                        patches_per_s=f"{len(batch['image']) / (time.perf_counter() - start):.1f}")
        bar.update()
    bar.close()
    return float(np.mean(losses)) if losses else float("nan")


def dice_per_organ(reference: np.ndarray, predicted: np.ndarray, organs: dict[int, str]) -> dict[str, float]:
    """Dice per organ; NaN where the organ is absent from both (left out of means)."""
    from medseg.metrics import confusion, dice

    scores = {}
    for label_id, name in organs.items():
        scores[name] = dice(*confusion(reference == label_id, predicted == label_id)[:3])
    return scores


def validate(network, subjects: list[tio.Subject], task: Task, plan: NetworkPlan, device: torch.device,
             world: World = World(), precision: str = "auto") -> dict[str, float]:
    """Full-volume sliding-window inference on held-out cases (model space), mean Dice per organ.

    `subjects` are this rank's share; the per-case scores of all ranks are gathered, so every rank
    returns the same means.
    """
    network.eval()
    per_case = []
    for subject in subjects:
        logits = sliding_window_logits(network, subject["image"].data, plan.patch_size, task.inference.overlap,
                                       task.inference.sw_batch_size, task.inference.blending, device, precision)
        predicted = logits.argmax(0).numpy().astype(np.uint8)
        scores = dice_per_organ(subject["label"].data[0].numpy(), predicted, task.label_names)
        if CONTOURED in subject:  # an organ the case did not contour has no reference to score against
            scores.update({name: float("nan") for i, name in task.label_names.items() if not subject[CONTOURED][i]})
        per_case.append(scores)
    per_case = [scores for share in world.gather(per_case) for scores in share]
    return {name: float(np.nanmean([c[name] for c in per_case])) if any(not math.isnan(c[name]) for c in per_case)
            else float("nan") for name in task.label_names.values()}


# ------------------------------------------------------------------------------------- the run


def _resolve_run(options: TrainOptions) -> tuple[Path, dict | None]:
    """The run folder, and its saved config when resuming."""
    if options.resume:
        folder = options.out
        if folder is None:
            task_name = Path(str(options.task)).stem
            runs = sorted(Path("runs", task_name).glob("*/config.json"), key=lambda p: p.stat().st_mtime)
            if not runs:
                raise InputError(f"--resume found no run under runs/{task_name}/; pass --out RUN_FOLDER")
            folder = runs[-1].parent
        config_path = Path(folder) / CONFIG_NAME
        if not config_path.is_file():
            raise InputError(f"--resume: {folder} has no {CONFIG_NAME} (not a medseg run folder)")
        return Path(folder), json.loads(config_path.read_text())
    task_name = Path(str(options.task)).stem if str(options.task).endswith((".yaml", ".yml", ".json")) else str(options.task)
    folder = options.out or Path("runs", task_name, datetime.now().strftime("%Y%m%d-%H%M%S"))
    if (Path(folder) / "last.pt").exists():
        raise InputError(f"{folder} already holds a run; use --resume to continue it or choose another --out")
    return Path(folder), None


def _prepare(options: TrainOptions, folder: Path, saved: dict | None):
    """Task, cases, split and preprocessing: from the saved config on resume, else worked out now."""
    if saved:
        task = parse_task(saved["task"], str(folder / CONFIG_NAME))
        data = Path(saved["data"])
        split = saved["split"]
        prep = Preprocessing.from_dict(saved["preprocessing"])
        plan = NetworkPlan.from_dict(saved["network"])
        cases = {c.name: c for c in load_dataset(data)}
        return task, data, split, prep, plan, cases, saved
    task = load_task(options.task)
    data = Path(options.data) if options.data else None
    if data is None:
        if not task.sample_data:
            raise InputError(f"task '{task.name}' has no bundled sample data; pass --data DATASET_FOLDER")
        data = sample_data_dir(task.sample_data)
    cases = {c.name: c for c in load_dataset(data)}
    labelled = [name for name, case in cases.items() if case.label is not None]
    if not labelled:
        raise InputError(f"{data}: no labelled training cases")
    split = make_split(labelled, options.folds, options.fold, options.seed)
    fingerprint = compute_fingerprint([cases[n] for n in split["train"]], task)
    prep = resolve_preprocessing(task, fingerprint)
    plan = plan_network(task.network, len(task.channels), task.num_classes, task.patch_size, prep.spacing)
    bad = [p for p, d in zip(task.patch_size, plan.divisor) if p % d]
    if bad:
        raise InputError(f"patch_size {task.patch_size} must be a multiple of {plan.divisor} for this network")
    schedule = task.schedule
    config = {
        "medseg_version": __version__,
        "created": datetime.now().isoformat(timespec="seconds"),
        "task": task_to_dict(task),
        "data": str(Path(data).resolve()),
        "split": split,
        "folds": {"folds": options.folds, "fold": options.fold, "seed": options.seed},
        "preprocessing": prep.to_dict(),
        "network": plan.to_dict(),
        "fingerprint": fingerprint,
        "epochs": options.epochs or schedule.epochs,
        "max_minutes": options.max_minutes if options.max_minutes is not None else schedule.max_minutes,
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_text(json.dumps(config, indent=2), folder / CONFIG_NAME)
    write_text(json.dumps(split, indent=2), folder / "split.json")
    return task, data, split, prep, plan, cases, config


def _open_run(options: TrainOptions) -> tuple[Path, tuple]:
    """Create or reopen the run folder and work out the run (`_prepare`); only rank 0 runs this."""
    folder, saved = _resolve_run(options)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp*"):  # a write cut short by a kill: the file it was replacing is intact
        stale.unlink()
    (folder / "cache").mkdir(exist_ok=True)
    prepared = _prepare(options, folder, saved)
    config = prepared[-1]
    if saved and (options.epochs or options.max_minutes is not None):
        config.update({k: v for k, v in (("epochs", options.epochs), ("max_minutes", options.max_minutes)) if v})
        write_text(json.dumps(config, indent=2), folder / CONFIG_NAME)
    return folder, prepared


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _restore_rng(state: dict, world: World, seed: int) -> None:
    """Each rank continues its own random stream; a rank the checkpoint has none for (the job grew)
    starts a new one."""
    streams = state.get("rng_ranks", [state["rng"]])
    if world.rank < len(streams):
        set_rng_state(streams[world.rank])
    else:
        _seed(seed + world.rank + state["progress"]["step"])


def fit(options: TrainOptions, world: World | None = None) -> Path:
    """Train (or resume) one run; returns the run folder.

    Args:
        options: the run's runtime choices.
        world: the processes training together, from `medseg.distributed.joined` (its device replaces
            `options.device`); None: this process alone on `options.device`.
    """
    import sys

    world = world or World(resolve_device(options.device))
    folder, (task, data, split, prep, plan, cases, config) = world.from_main(lambda: _open_run(options))
    log = make_logger(folder) if world.is_main else silent_logger()
    device = world.device
    precision = resolve_precision(options.precision, device)
    _seed(options.seed + world.rank)  # sampling differs per rank; DDP gives all ranks rank 0's initial weights
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    start = time.perf_counter()
    cache = folder / "cache"
    missing = [n for n in split["train"] + split["validation"] if n not in cases]
    if missing:
        raise InputError(f"{data}: cases {missing[:3]} of the run's split are missing from the dataset")
    if len(split["train"]) < world.size:
        raise InputError(f"{len(split['train'])} training cases cannot be shared among {world.size} "
                         f"processes; start at most {len(split['train'])}")
    train_subjects = [load_subject(cases[n], prep, task, cache) for n in world.shard(split["train"])]
    val_subjects = [load_subject(cases[n], prep, task, cache) for n in world.shard(split["validation"])]
    shared = f", shared among {world.size} processes" if world.size > 1 else ""
    log.info(f"{task.name}: {len(split['train'])} training / {len(split['validation'])} validation cases "
             f"from {data}{shared}; spacing {prep.spacing} mm, patch {task.patch_size}, {plan.name} "
             f"{plan.filters}; preprocessed in {time.perf_counter() - start:.1f} s on {device} ({precision})")

    network = prepare_network(build_network(plan), device, precision, training=True)
    optimizer = make_optimizer(task, network)
    progress = Progress()
    if options.resume and (folder / "last.pt").is_file():  # every rank reads it: the run folder is shared
        state = load_checkpoint(folder / "last.pt")
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        progress = Progress(**state["progress"])
        _restore_rng(state, world, options.seed)
        log.info(f"resumed from epoch {progress.epoch}, step {progress.step}")
    model = network
    if world.size > 1:  # starts every rank from rank 0's weights, then averages the gradients of each step
        model = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None)
    model = torch.compile(model) if options.compile else model
    loss_fn = make_loss(task, plan)
    epochs = config["epochs"]
    total_steps = epochs * task.schedule.steps_per_epoch
    budget = config["max_minutes"] * 60 if config.get("max_minutes") else None
    table = MetricsTable(folder / "metrics.csv", list(task.label_names.values())) if world.is_main else None
    board = TensorBoard(folder) if world.is_main else None
    batches = patch_batches(train_subjects, task, device)
    show_bar = sys.stderr.isatty() and world.is_main

    def checkpoint(name: str, rng_states: list[dict]) -> None:
        state = {"model": network.state_dict(), "optimizer": optimizer.state_dict(),
                 "progress": vars(progress).copy(), "rng": rng_states[0]}
        if len(rng_states) > 1:
            state["rng_ranks"] = rng_states
        save_checkpoint(folder / name, state)

    try:
        while progress.epoch < epochs and progress.fraction(total_steps, budget) < 1.0:
            epoch_start = time.perf_counter()
            loss = train_one_epoch(model, batches, loss_fn, optimizer, task, progress, total_steps, budget, device,
                                   show_bar, world, precision)
            loss = world.mean(loss)
            progress.epoch += 1
            done = progress.epoch >= epochs or progress.fraction(total_steps, budget) >= 1.0
            scores = {}
            if progress.epoch % task.schedule.validate_every == 0 or done:
                scores = validate(network, val_subjects, task, plan, device, world, precision)
            mean = float(np.nanmean(list(scores.values()))) if scores else None
            improved = mean is not None and mean > progress.best_dice
            if improved:
                progress.best_dice = mean
            rng_states = world.gather(rng_state())
            row = {"epoch": progress.epoch, "step": progress.step, "train_loss": loss, "mean_dice": mean,
                   "lr": learning_rate(task, progress.fraction(total_steps, budget)),
                   "seconds": time.perf_counter() - epoch_start, **{f"dice_{k}": v for k, v in scores.items()}}
            if world.is_main:
                if improved:
                    save_checkpoint(folder / "best.pt",
                                    {"model": network.state_dict(), "epoch": progress.epoch, "mean_dice": mean})
                checkpoint("last.pt", rng_states)
                table.append(row)
                table.plot(folder / "training_curve.png")
                board.scalars({"loss/train": loss, "dice/mean": mean, "lr": row["lr"],
                               **{f"dice/{k}": v for k, v in scores.items()}}, progress.step)
            dice_text = f", val Dice {mean:.3f} (" + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()) + ")" if scores else ""
            log.info(f"epoch {progress.epoch}/{epochs} step {progress.step}: loss {loss:.4f}{dice_text}, "
                     f"lr {row['lr']:.2g}, {row['seconds']:.1f} s")
    except KeyboardInterrupt:
        if world.is_main:  # no collective here: the other ranks may be gone; they start new streams on resume
            checkpoint("last.pt", [rng_state()])
        log.info(f"interrupted: saved {folder / 'last.pt'}; continue with `medseg train --resume --out {folder}`")
        raise
    finally:
        if board is not None:
            board.close()
    # No validation ran (e.g. a zero budget): the last weights serve.
    if world.is_main and not (folder / "best.pt").is_file():
        save_checkpoint(folder / "best.pt", {"model": network.state_dict(), "epoch": progress.epoch, "mean_dice": -1.0})
    log.info(f"done: best validation mean Dice {progress.best_dice:.3f}; model folder {folder}")
    return folder
