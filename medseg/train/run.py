"""A training run: open (or reopen) the run folder, prepare the cases, alternate epochs and validation.

`fit` prepares a run folder that describes itself (`medseg.model.folder.RunConfig`: task, spacing,
normalisation, network), preprocesses every case once (cached in the run folder), then alternates
`train_one_epoch` and `validate` and keeps `best.pt` and `last.pt`.

Under torchrun (a `World` of several processes) the same functions train with DistributedDataParallel:
rank 0 opens the run folder and alone writes config, checkpoints, metrics, curve, TensorBoard and log;
each rank preprocesses, caches and samples only its share of the training cases (case i to rank
i % size), with its own random stream, while DDP keeps the weights identical by starting every rank
from rank 0's and averaging gradients. Validation is sharded the same way and its per-case Dice
gathered, so every rank computes the same scores. Step times are agreed (the slowest rank's), so
every rank takes the same `--max-minutes` decisions and none is left waiting in a collective.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.config import load_task, sample_data_dir
from medseg.data.datasets import Case, load_dataset
from medseg.data.fingerprint import compute_fingerprint
from medseg.data.patches import load_subject, make_split, patch_batches
from medseg.data.preprocess import resolve_preprocessing
from medseg.distributed import World
from medseg.errors import InputError
from medseg.infer.calibration import calibrate_after_training, reserve_seconds
from medseg.io import write_text
from medseg.model.folder import (CONFIG_NAME, RunConfig, load_checkpoint, read_run_config, save_checkpoint,
                                 write_run_config)
from medseg.model.networks import build_network, plan_network
from medseg.runtime import prepare_network, resolve_device, resolve_precision
from medseg.train.runfolder import (MetricsTable, TensorBoard, make_logger, rng_state, set_rng_state,
                                    silent_logger)
from medseg.train.budget import Budget, Plan, choose_layout, choose_width, make_plan
from medseg.train.steps import Progress, WeightAverage, learning_rate, make_loss, make_optimizer, train_one_epoch
from medseg.train.transfer import check_options, freeze_for_epoch, start_weights
from medseg.train.validation import ValidationCost, measure_validation, validate


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
    init_weights: Path | None = None  # model folder or checkpoint to start from (medseg.train.transfer)
    freeze_encoder_epochs: int = 0  # with init_weights: epochs the encoder stays frozen
    calibrate: bool = True  # at the end, per-organ confidence thresholds from the validation cases (confidence.json)


# ---------------------------------------------------------------------------- the run folder


def _resolve_run(options: TrainOptions) -> tuple[Path, RunConfig | None]:
    """The run folder, and its saved config when resuming."""
    if not options.resume:
        task = str(options.task)
        name = Path(task).stem if task.endswith((".yaml", ".yml", ".json")) else task
        folder = Path(options.out or Path("runs", name, datetime.now().strftime("%Y%m%d-%H%M%S")))
        if (folder / "last.pt").exists():
            raise InputError(f"{folder} already holds a run; use --resume to continue it or choose another --out")
        return folder, None
    folder = options.out
    if folder is None:
        name = Path(str(options.task)).stem
        runs = sorted(Path("runs", name).glob(f"*/{CONFIG_NAME}"), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise InputError(f"--resume found no run under runs/{name}/; pass --out RUN_FOLDER")
        folder = runs[-1].parent
    if not (Path(folder) / CONFIG_NAME).is_file():
        raise InputError(f"--resume: {folder} has no {CONFIG_NAME} (not a medseg run folder)")
    return Path(folder), read_run_config(folder)


def _new_config(options: TrainOptions) -> RunConfig:
    """Task, split, preprocessing and network plan worked out for a new run."""
    task = load_task(options.task)
    if not options.data and not task.sample_data:
        raise InputError(f"task '{task.name}' has no bundled sample data; pass --data DATASET_FOLDER")
    data = Path(options.data) if options.data else sample_data_dir(task.sample_data)
    cases = {c.name: c for c in load_dataset(data)}
    labelled = [name for name, case in cases.items() if case.label is not None]
    if not labelled:
        raise InputError(f"{data}: no labelled training cases")
    split = make_split(labelled, options.folds, options.fold, options.seed)
    fingerprint = compute_fingerprint([cases[n] for n in split["train"]], task)
    prep = resolve_preprocessing(task, fingerprint)
    plan_for = lambda filters: plan_network(replace(task.network, filters=filters), len(task.channels),  # noqa: E731
                                            task.num_classes, task.patch_size, prep.spacing, task.dimensions)
    plan = plan_for(task.network.filters)
    if any(p % d for p, d in zip(task.patch_size, plan.divisor)):
        raise InputError(f"patch_size {task.patch_size} must be a multiple of {plan.divisor} for this network")
    minutes = options.max_minutes if options.max_minutes is not None else task.schedule.max_minutes
    device, choice = resolve_device(options.device), {"filters": list(plan.filters)}
    precision = resolve_precision(options.precision, device)  # the layout and the width are timed in it
    if task.schedule.target_steps and minutes:  # the widest network the budget trains far enough
        plan, choice = choose_width(task, plan_for, minutes * 60, device, precision)
        task = replace(task, network=replace(task.network, filters=plan.filters))
    return RunConfig(task=task, preprocessing=prep, network=plan, split=split, data=str(Path(data).resolve()),
                     folds={"folds": options.folds, "fold": options.fold, "seed": options.seed},
                     fingerprint=fingerprint, epochs=options.epochs or task.schedule.epochs, max_minutes=minutes,
                     network_choice={**choice, "layout": choose_layout(plan, task, device, precision)})


def _open_run(options: TrainOptions) -> tuple[Path, RunConfig]:
    """Create or reopen the run folder and write its config; only rank 0 runs this."""
    folder, saved = _resolve_run(options)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp*"):  # a write cut short by a kill: the file it was replacing is intact
        stale.unlink()
    (folder / "cache").mkdir(exist_ok=True)
    config = _new_config(options) if saved is None else saved.with_budget(options.epochs, options.max_minutes)
    if config != saved:
        write_run_config(config, folder)
    return folder, config


# --------------------------------------------------------------------------------- the training


@dataclass
class _Training:
    """Everything one rank holds while it trains."""

    folder: Path
    config: RunConfig
    world: World
    precision: str
    log: logging.Logger
    network: torch.nn.Module  # the weights that are saved
    model: torch.nn.Module  # what steps call: the network, or its DDP / compiled wrapper
    optimizer: torch.optim.Optimizer
    batches: Any  # iterator of patch batches
    validation: list  # this rank's validation subjects
    budget: Budget
    progress: Progress = field(default_factory=Progress)
    average: WeightAverage | None = None  # EMA of the weights (schedule.ema_decay)
    table: MetricsTable | None = None
    board: TensorBoard | None = None
    validation_seconds: float = 0.0  # the last validation's, or its estimate
    validation_cost: ValidationCost | None = None  # measured at the start of a budgeted run; its backend validates
    validate_every: int = 1  # epochs between intermediate validations (the task's, then the plan's)
    plan: Plan | None = None
    preprocessing_seconds: float = 0.0
    freeze_epochs: int = 0  # the encoder is frozen before this epoch (medseg.train.transfer)
    calibrate: bool = False  # the run ends with a confidence calibration (its time is kept back with a budget)

    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.config.task.schedule.steps_per_epoch

    def fraction(self) -> float:
        """The schedule's progress: steps done of those planned, or the budget spent (the reserve included).

        The slowest rank's value, so that every rank takes the same decisions at the same step.
        """
        return self.world.max(max(self.progress.step / self.total_steps, self.budget.fraction()))

    def weights(self) -> dict:
        """The weights that are validated and saved as the model: the average where there is one."""
        return self.average.state_dict(self.network) if self.average else self.network.state_dict()

    def checkpoint(self, name: str, rng_states: list[dict]) -> None:
        self.progress.wall_seconds = self.budget.elapsed()
        state = {"model": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "progress": vars(self.progress).copy(), "rng": rng_states[0]}
        if self.average:
            state["average"] = self.average.to_dict()
        if len(rng_states) > 1:
            state["rng_ranks"] = rng_states
        save_checkpoint(self.folder / name, state)


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


def _load_subjects(config: RunConfig, folder: Path, world: World) -> tuple[list, list]:
    """This rank's share of the training and validation cases, preprocessed (cached in the run folder)."""
    cases: dict[str, Case] = {c.name: c for c in load_dataset(config.data)}
    split = config.split
    missing = [n for n in split["train"] + split["validation"] if n not in cases]
    if missing:
        raise InputError(f"{config.data}: cases {missing[:3]} of the run's split are missing from the dataset")
    if len(split["train"]) < world.size:
        raise InputError(f"{len(split['train'])} training cases cannot be shared among {world.size} "
                         f"processes; start at most {len(split['train'])}")
    load = lambda name: load_subject(cases[name], config.preprocessing, config.task, folder / "cache")  # noqa: E731
    validation = split["validation"][:config.task.schedule.validation_cases]  # the same cases every time
    return [load(n) for n in world.shard(split["train"])], [load(n) for n in world.shard(validation)]


def _start(options: TrainOptions, world: World, budget: Budget) -> _Training:
    """Open the run, load the cases, build (or restore) network and optimiser on this rank."""
    check_options(options.init_weights, options.freeze_encoder_epochs, world.size)
    folder, config = world.from_main(lambda: _open_run(options))
    log = make_logger(folder) if world.is_main else silent_logger()
    device, task, plan = world.device, config.task, config.network
    precision = resolve_precision(options.precision, device)
    _seed(options.seed + world.rank)  # sampling differs per rank; DDP gives all ranks rank 0's initial weights
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    budget.seconds = config.max_minutes * 60 if config.max_minutes else None
    train_subjects, val_subjects = _load_subjects(config, folder, world)
    preprocessing_seconds = budget.elapsed()
    shared = f", shared among {world.size} processes" if world.size > 1 else ""
    log.info(f"{task.name}: {len(config.split['train'])} training / {len(config.split['validation'])} validation "
             f"cases from {config.data}{shared}; spacing {config.preprocessing.spacing} mm, patch {task.patch_size}, "
             f"{plan.name} {plan.filters}; preprocessed in {preprocessing_seconds:.1f} s on {device} ({precision})")
    network = prepare_network(build_network(plan), device, precision, training=True, channels_last=config.channels_last)
    freeze_epochs = start_weights(network, folder, plan.name, options.init_weights, options.freeze_encoder_epochs,
                                  options.resume, log, world.is_main)
    run = _Training(folder, config, world, precision, log, network, network, make_optimizer(task, network),
                    patch_batches(train_subjects, task, device), val_subjects, budget,
                    preprocessing_seconds=preprocessing_seconds, validate_every=task.schedule.validate_every,
                    average=WeightAverage(network, task.schedule.ema_decay) if task.schedule.ema_decay else None,
                    table=MetricsTable(folder / "metrics.csv", list(task.label_names.values())) if world.is_main else None,
                    board=TensorBoard(folder) if world.is_main else None, freeze_epochs=freeze_epochs,
                    calibrate=options.calibrate)
    if options.resume and (folder / "last.pt").is_file():  # every rank reads it: the run folder is shared
        _restore(run, load_checkpoint(folder / "last.pt"), options.seed)
    if world.size > 1:  # starts every rank from rank 0's weights, then averages the gradients of each step
        run.model = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None)
    run.model = torch.compile(run.model) if options.compile else run.model
    return run


def _restore(run: _Training, state: dict, seed: int) -> None:
    """Continue from last.pt: weights, optimiser, average, progress (and the time already spent), random streams."""
    run.network.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.average and "average" in state:
        run.average.load(state["average"])
    run.progress = Progress(**state["progress"])
    run.budget.used_before = run.progress.wall_seconds
    _restore_rng(state, run.world, seed)
    run.log.info(f"resumed from epoch {run.progress.epoch}, step {run.progress.step} "
                 f"({run.progress.wall_seconds / 60:.1f} min of the budget spent)")


def _validate(run: _Training) -> dict[str, float]:
    """Validation Dice per organ with the weights that are saved; its seconds become the reserve."""
    start = time.perf_counter()
    backend = run.validation_cost.backend if run.validation_cost else "torch"
    with run.average.applied(run.network) if run.average else contextlib.nullcontext():
        scores = validate(run.network, run.validation, run.config.task, run.config.network, run.world.device, run.world,
                          run.precision, run.config.preprocessing, backend)
    _set_validation_seconds(run, run.world.max(time.perf_counter() - start))
    return scores


def _measure_validation(run: _Training) -> None:
    """One case timed through each backend (`measure_validation`): the backend for the run's
    validations, and the final validation's estimated time kept back from the steps."""
    run.validation_cost = measure_validation(run.network, run.validation, run.config.task, run.config.network,
                                             run.world.device, run.world, run.precision, run.config.preprocessing)
    _set_validation_seconds(run, run.validation_cost.seconds)


def _set_validation_seconds(run: _Training, seconds: float) -> None:
    """The final validation's time, and the calibration's after it, are kept back from the steps."""
    run.validation_seconds = seconds
    if run.budget.seconds:
        run.budget.reserve = seconds + (reserve_seconds(seconds, run.config) if run.calibrate else 0.0)


def _make_plan(run: _Training, step_seconds: list[float]) -> None:
    """The plan for the rest of the run, from the first epoch's measured steps; logged and saved."""
    schedule = run.config.task.schedule
    context = {"device": str(run.world.device), "precision": run.precision,
               "preprocessing_seconds": round(run.preprocessing_seconds, 1),
               "validation_cases": len(run.config.split["validation"][:schedule.validation_cases]),
               "validation": run.validation_cost.to_dict() if run.validation_cost else {},
               "network": run.config.network_choice or {"filters": list(run.config.network.filters)}}
    run.plan = make_plan(run.budget, run.config.epochs - run.progress.epoch, schedule.steps_per_epoch,
                         float(np.median(step_seconds)), run.validation_seconds, schedule.validate_every, context,
                         steps_done=run.progress.step)
    run.validate_every = run.plan.validate_every
    run.log.info(run.plan.summary())
    if run.world.is_main:
        write_text(json.dumps(run.plan.to_dict(), indent=2), run.folder / "plan.json")


def _epoch(run: _Training, loss_fn, show_bar: bool) -> bool:
    """One epoch of steps, validation when due and when it fits, then checkpoints, table and log line.

    Returns whether it was the last: that one is always validated.
    """
    task, progress, world = run.config.task, run.progress, run.world
    epoch_start = time.perf_counter()
    freeze_for_epoch(run.network, run.config.network.name, progress.epoch, run.freeze_epochs, run.log)
    loss, step_seconds = train_one_epoch(run.model, run.batches, loss_fn, run.optimizer, task, progress, run.fraction,
                                         world.device, show_bar, world, run.precision, run.average)
    loss = world.mean(loss)
    progress.epoch += 1
    if run.plan is None and step_seconds:
        _make_plan(run, step_seconds)
    done = progress.finished = progress.epoch >= run.config.epochs or run.fraction() >= 1.0
    due = progress.epoch % run.validate_every == 0 and world.max(float(run.budget.fits(run.validation_seconds))) > 0
    validation_start = time.perf_counter()
    scores = _validate(run) if done or due else {}
    validation_seconds = time.perf_counter() - validation_start if scores else 0.0
    mean = float(np.nanmean(list(scores.values()))) if scores else None
    improved = mean is not None and mean > progress.best_dice
    if improved:
        progress.best_dice = mean
    rng_states = world.gather(rng_state())
    row = {"epoch": progress.epoch, "step": progress.step, "train_loss": loss, "mean_dice": mean,
           "lr": learning_rate(task, run.fraction()), "seconds": time.perf_counter() - epoch_start,
           "step_seconds": sum(step_seconds), "validation_seconds": validation_seconds,
           **{f"dice_{k}": v for k, v in scores.items()}}
    if world.is_main:
        if improved:
            save_checkpoint(run.folder / "best.pt", {"model": run.weights(), "epoch": progress.epoch, "mean_dice": mean})
        run.checkpoint("last.pt", rng_states)
        run.table.append(row)
        run.table.plot(run.folder / "training_curve.png")
        run.board.scalars({"loss/train": loss, "dice/mean": mean, "lr": row["lr"],
                           **{f"dice/{k}": v for k, v in scores.items()}}, progress.step)
    dice_text = (f", val Dice {mean:.3f} (" + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()) + ")"
                 if scores else "")
    run.log.info(f"epoch {progress.epoch}/{run.config.epochs} step {progress.step}: loss {loss:.4f}{dice_text}, "
                 f"lr {row['lr']:.2g}, {row['seconds']:.1f} s, {run.budget.elapsed() / 60:.1f} min of the run")
    return done


def fit(options: TrainOptions, world: World | None = None) -> Path:
    """Train (or resume) one run; returns the run folder.

    With a time budget (`--max-minutes`, or the task's `schedule.max_minutes`) the clock starts here:
    preprocessing, steps, validation, the final model and its calibration all count (`medseg.train.budget`).

    Args:
        options: the run's runtime choices.
        world: the processes training together, from `medseg.distributed.joined` (its device replaces
            `options.device`); None: this process alone on `options.device`.
    """
    budget = Budget(None)
    world = world or World(resolve_device(options.device))
    run = _start(options, world, budget)
    loss_fn = make_loss(run.config.task, run.config.network)
    if budget.seconds:  # one case timed: the validations' backend, and the final one's time kept back
        _measure_validation(run)
    show_bar = sys.stderr.isatty() and world.is_main
    try:
        more = options.epochs or options.max_minutes  # a finished run, resumed, re-plans only when given more
        done = (run.progress.finished and not more) or run.progress.epoch >= run.config.epochs or run.fraction() >= 1
        while not done:
            done = _epoch(run, loss_fn, show_bar)
    except KeyboardInterrupt:
        if world.is_main:  # no collective here: the other ranks may be gone; they start new streams on resume
            run.checkpoint("last.pt", [rng_state()])
        run.log.info(f"interrupted: saved {run.folder / 'last.pt'}; continue: `medseg train --resume --out {run.folder}`")
        raise
    finally:
        if run.board is not None:
            run.board.close()
    if world.is_main and not (run.folder / "best.pt").is_file():  # no validation ran: the last weights serve
        save_checkpoint(run.folder / "best.pt", {"model": run.weights(), "epoch": run.progress.epoch, "mean_dice": -1.0})
    if world.is_main and run.calibrate:  # medseg.infer.calibration: the QA flags' per-organ thresholds
        calibrate_after_training(run.folder, str(world.device), options.precision, run.log, run.validation_cost)
    run.log.info(f"done: best validation mean Dice {run.progress.best_dice:.3f}; {run.budget.elapsed() / 60:.1f} min "
                 f"wall-clock; model folder {run.folder}")
    return run.folder
