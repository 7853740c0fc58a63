"""Optimisation steps: the optimiser, the learning-rate schedule, one step and one epoch of steps.

The schedule runs on progress = max(steps done / steps planned, time used / time budget), so a
`--max-minutes` budget still ends with a fully decayed learning rate.
"""

from __future__ import annotations

import math
import time
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
