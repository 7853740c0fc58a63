"""Several processes, one job: torchrun's processes as a `World`, with the few collectives medseg needs.

torchrun (`python -m torch.distributed.run`) starts one process per GPU, on one machine or many, and
tells each who it is through RANK, WORLD_SIZE and LOCAL_RANK. `joined` reads them once, at the CLI,
and joins the process group for the length of a command: NCCL with process i on `cuda:LOCAL_RANK`,
gloo on the CPU. Everything below the CLI takes the `World` as an argument. A single process (no
torchrun) is a `World` of size 1 whose collectives return their input: no process group is created.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

from medseg.errors import InputError
from medseg.runtime import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one job."""

    device: torch.device = torch.device("cpu")  # this process's device: cuda:LOCAL_RANK under torchrun on GPUs
    rank: int = 0  # 0..size-1 over all machines; rank 0 writes the results
    size: int = 1  # number of processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's share of `items`: item i goes to rank i % size."""
        return list(items[self.rank::self.size])

    def gather(self, value: T) -> list[T]:
        """`value` of every rank, in rank order, on every rank (any picklable object)."""
        if self.size == 1:
            return [value]
        values = [None] * self.size
        torch.distributed.all_gather_object(values, value)
        return values

    def max(self, value: float) -> float:
        """The largest `value` over the ranks, on every rank."""
        return self._reduce(value, torch.distributed.ReduceOp.MAX)

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks, on every rank."""
        return self._reduce(value, torch.distributed.ReduceOp.SUM) / self.size

    def _reduce(self, value: float, op) -> float:
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor, op)
        return float(tensor.item())

    def from_main(self, make: Callable[[], T]) -> T:
        """`make()` run on rank 0 alone, its result shared with every rank.

        An `InputError` raised by `make` is raised on every rank, so that no rank is left waiting
        for a result that will never come and every rank prints the same one-line error.
        """
        if self.size == 1:
            return make()
        box = [None]
        if self.is_main:
            try:
                box[0] = ("result", make())
            except InputError as error:
                box[0] = ("error", error)
        torch.distributed.broadcast_object_list(box, src=0, device=self.device)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value


def torchrun_ranks(environ: Mapping[str, str]) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from the variables torchrun sets, or None outside torchrun."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    if not all(name in environ for name in names):
        return None
    try:
        rank, size, local_rank = (int(environ[name]) for name in names)
    except ValueError:
        found = ", ".join(f"{name}={environ[name]!r}" for name in names)
        raise InputError(f"torchrun variables must be integers, got {found}") from None
    return rank, size, local_rank


def process_device(requested: str, local_rank: int) -> torch.device:
    """The device of the process with `local_rank` on its machine: one GPU each, or the CPU."""
    device = resolve_device(requested)
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise InputError(f"--device {requested} names one GPU, but under torchrun each process takes "
                         f"cuda:LOCAL_RANK; pass --device cuda (or auto)")
    if local_rank >= torch.cuda.device_count():
        raise InputError(f"process with LOCAL_RANK {local_rank} has no GPU: this machine shows "
                         f"{torch.cuda.device_count()}; start at most that many processes per node")
    return torch.device("cuda", local_rank)


@contextmanager
def joined(requested_device: str, environ: Mapping[str, str]) -> Iterator[World]:
    """This process's `World` for the length of a command.

    Under torchrun with several processes it joins the process group (NCCL on GPUs, gloo on the CPU)
    and leaves it at the end; otherwise it is a one-process world on `requested_device` and touches
    nothing.
    """
    ranks = torchrun_ranks(environ)
    if ranks is None or ranks[1] == 1:
        yield World(resolve_device(requested_device))
        return
    rank, size, local_rank = ranks
    device = process_device(requested_device, local_rank)
    if device.type == "cuda":  # NCCL wants each process bound to its own GPU before the group is made
        torch.cuda.set_device(device)
    # MASTER_ADDR and MASTER_PORT, also set by torchrun, are read by the default env:// rendezvous.
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=size)
    try:
        yield World(device, rank, size)
    finally:
        torch.distributed.destroy_process_group()


def launch(nproc: int, module_args: Sequence[str]) -> int:
    """Run `python -m medseg ARGS` in `nproc` processes on this machine with torchrun; returns the exit code.

    torchrun runs in this process (as `accelerate launch` does), so that a failed rank ends the command
    with that rank's exit code (2 for bad input) after its one-line error, not with torchrun's report.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(["--standalone", "--nproc_per_node", str(nproc), "-m", "medseg", *module_args]))
    except ChildFailedError as failed:
        code = failed.get_first_failure()[1].exitcode
        return code if code > 0 else 1  # negative: killed by a signal
    return 0


def train_arguments(options) -> list[str]:
    """`medseg train` arguments that give back `options` (a `medseg.train.TrainOptions`)."""
    import dataclasses

    arguments = ["train"]
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):  # a switch: given only where it differs from its default
            arguments += [] if value == field.default else [flag if value else "--no-" + flag[2:]]
        elif value is not None:
            arguments += [flag, str(value)]
    return arguments


def launch_training(nproc: int, options) -> int:
    """`medseg train --nproc N`: train `options` with `nproc` processes on this machine, started by torchrun;
    returns the exit code."""
    import os

    if torchrun_ranks(os.environ) is not None:
        raise InputError(f"--nproc {nproc} starts torchrun, but this process already runs under torchrun; "
                         f"leave --nproc out and use torchrun's --nproc_per_node")
    return launch(nproc, train_arguments(options))
