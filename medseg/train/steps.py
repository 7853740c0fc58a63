"""Optimisation steps: the optimiser, the learning-rate schedule, one step and one epoch of steps.

The schedule runs on progress = max(steps done / steps planned, time used / time budget), so a
`--max-minutes` budget still ends with a fully decayed learning rate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from medseg.config import Task
from medseg.data.partial import CONTOURED
from medseg.distributed import World
from medseg.model.networks import NetworkPlan
from medseg.runtime import autocast


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
    from medseg.model.losses import build_loss

    return build_loss(task, plan.deep_supervision)


@dataclass
class Progress:
    """Where a run stands; stored in last.pt so a resumed run continues the same schedule."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimisation steps completed
    seconds: float = 0.0  # seconds spent in optimisation steps
    best_dice: float = -1.0
    wall_seconds: float = 0.0  # wall-clock seconds of the whole run so far (the budget's clock)
    finished: bool = False  # its last epoch ran: a resume trains on only when given more epochs or minutes


class WeightAverage:
    """Exponential moving average (EMA) of a network's weights, for validation and the saved model.

    Short schedules end with weights that still jump from batch to batch; their average over the last
    few hundred steps scores higher (Polyak averaging; nnU-Net's EMA of the pseudo-Dice serves model
    selection, timm's EMA the weights). The decay ramps up as (1 + t) / (10 + t), so the first steps are
    not averaged with the random start.
    """

    def __init__(self, network: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in network.state_dict().items()
                       if v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, network: torch.nn.Module) -> None:
        self.updates += 1
        weight = 1.0 - min(self.decay, (1 + self.updates) / (10 + self.updates))
        for key, value in network.state_dict().items():
            if key in self.shadow:
                self.shadow[key].lerp_(value.float(), weight)

    def state_dict(self, network: torch.nn.Module) -> dict:
        """The network's state dict with the averaged weights in it."""
        return {k: self.shadow[k].to(v.dtype) if k in self.shadow else v for k, v in network.state_dict().items()}

    @contextmanager
    def applied(self, network: torch.nn.Module):
        """The network holds the averaged weights inside the block, its own weights again after it."""
        own = {k: v.detach().clone() for k, v in network.state_dict().items()}
        network.load_state_dict(self.state_dict(network))
        try:
            yield network
        finally:
            network.load_state_dict(own)

    def to_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.shadow = {k: v.float() for k, v in state["shadow"].items()}


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


def train_one_epoch(network, batches, loss_fn, optimizer, task: Task, progress: Progress,
                    fraction: Callable[[], float], device: torch.device, show_bar: bool, world: World = World(),
                    precision: str = "auto", average: WeightAverage | None = None) -> tuple[float, list[float]]:
    """Run up to `steps_per_epoch` steps, fewer once `fraction()` (the schedule's progress, 0 -> 1)
    reaches 1; returns this rank's mean loss and each step's seconds.

    Each step's time is the slowest rank's; `fraction` agrees the ranks' clocks, so that all ranks
    stop at the same step and none is left waiting in a collective.
    """
    from tqdm import tqdm

    network.train()
    losses, seconds = [], []
    bar = tqdm(total=task.schedule.steps_per_epoch, desc=f"epoch {progress.epoch + 1}", unit="step", leave=False,
               disable=not show_bar, dynamic_ncols=True)
    for _ in range(task.schedule.steps_per_epoch):
        done = fraction()
        if done >= 1.0:
            break
        start = time.perf_counter()
        batch = next(batches)
        lr = learning_rate(task, done)
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses.append(train_step(network, batch, loss_fn, optimizer, task, device, precision))
        if average is not None:
            average.update(network.module if hasattr(network, "module") else network)
        progress.step += 1
        seconds.append(world.max(time.perf_counter() - start))
        progress.seconds += seconds[-1]
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.2g}", patches_per_s=f"{len(batch['image']) / seconds[-1]:.1f}")
        bar.update()
    bar.close()
    return (float(np.mean(losses)) if losses else float("nan")), seconds
