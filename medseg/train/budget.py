"""A time budget that means wall-clock, and the plan made for it.

`--max-minutes` bounds the whole run: preprocessing, optimisation steps, validation and the final
model. The clock starts when `fit` starts. Time kept back for the last validation (the `reserve`) is
counted as spent, so the learning-rate schedule reaches zero early enough for that validation to end
inside the budget; an intermediate validation runs only where it fits beside the reserve.

The plan is made once the run has measured itself: preprocessing seconds, the median step time of the
first epoch and the time of a validation (`medseg.train.validation.measure_validation`: one case
timed through torch and, where installed, OpenVINO with its conversion; the cheaper backend for the
whole validation, scaled by its windows). It says how many steps and validations the budget holds and
why, is written to `plan.json` in the run folder and logged.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field


MIN_STEPS = 1000  # fewer planned steps than this: the plan warns that the model will be under-trained
VALIDATION_SHARE = 0.10  # at most this share of the budget goes to intermediate validations


@dataclass
class Budget:
    """Wall-clock seconds of one run, across resumes; None seconds: no limit."""

    seconds: float | None
    used_before: float = 0.0  # wall seconds spent by earlier sessions of this run (resume)
    reserve: float = 0.0  # seconds kept for what must follow the last step (the final validation)
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.used_before + time.perf_counter() - self.started

    def fraction(self) -> float:
        """Share of the budget spent, the reserve counted as spent; 0 without a budget."""
        return (self.elapsed() + self.reserve) / self.seconds if self.seconds else 0.0

    def fits(self, seconds: float) -> bool:
        """Whether `seconds` more work still leaves the reserve inside the budget."""
        return self.seconds is None or self.elapsed() + seconds + self.reserve <= self.seconds


@dataclass(frozen=True)
class Plan:
    """How a run spends its budget, with the figures it was made from and the reasons."""

    budget_minutes: float | None
    device: str
    precision: str
    threads: int
    cpu: str
    cpu_flags: list[str]
    preprocessing_seconds: float
    step_seconds: float  # median of the first epoch's steps
    validation_seconds: float  # one validation, estimated from one case
    validation_cases: int
    steps_planned: int  # steps the budget holds after preprocessing and validations
    validations_planned: int
    validate_every: int  # epochs between intermediate validations
    reasons: list[str]
    network: dict = field(default_factory=dict)  # the filters, and how the budget chose them where it did
    validation: dict = field(default_factory=dict)  # the measured cost (ValidationCost.to_dict); empty: not measured

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        budget = f"{self.budget_minutes:g} min" if self.budget_minutes else "no time limit"
        return (f"plan ({budget}, {self.device} {self.precision}, {self.threads} threads): preprocessing "
                f"{self.preprocessing_seconds:.0f} s, {self.step_seconds:.2f} s a step -> {self.steps_planned} steps, "
                f"{self.validations_planned} validations of {self.validation_cases} cases at "
                f"{self.validation_seconds:.1f} s; " + "; ".join(r for r in self.reasons + [self.network.get("reason"), self.network.get("layout", {}).get("reason")] if r))


def make_plan(budget: Budget, epochs_left: int, steps_per_epoch: int, step_seconds: float,
              validation_seconds: float, validate_every: int, context: dict, steps_done: int = 0) -> Plan:
    """Steps and validations for what is left of the budget, from measured step and validation times.

    Intermediate validations are spread so that together they take at most `VALIDATION_SHARE` of the
    budget (at least every `validate_every` epochs, as the task asks); the final validation is the
    reserve. Without a budget every epoch runs and validations follow the task.
    """
    import torch

    from medseg.runtime import cpu_flags, cpu_name

    reasons = []
    steps_by_epochs = epochs_left * steps_per_epoch
    if budget.seconds is None:
        steps, every = steps_by_epochs, validate_every
        reasons.append("no time limit: every planned epoch runs")
    else:
        left = max(0.0, budget.seconds - budget.elapsed() - validation_seconds)
        epoch_seconds = steps_per_epoch * step_seconds
        affordable = max(0, int(VALIDATION_SHARE * budget.seconds / max(validation_seconds, 1e-6)))
        epochs_in_time = left / max(epoch_seconds, 1e-6)
        every = max(validate_every, int(epochs_in_time / affordable) + 1 if affordable else 10**9)
        left -= validation_seconds * int(epochs_in_time / every)
        steps = min(steps_by_epochs, int(left / max(step_seconds, 1e-6)))
        reasons.append(f"validation every {every} epochs keeps it under {VALIDATION_SHARE:.0%} of the budget"
                       if every < 10**9 else "no intermediate validation fits: only the final one")
        reasons.append("the budget ends the run before the planned epochs" if steps < steps_by_epochs
                       else "the planned epochs end before the budget")
    if context.get("validation"):
        reasons.append(validation_reason(context["validation"]))
    steps += steps_done
    if steps < MIN_STEPS:
        faster = "a GPU" if context.get("precision") == "bf16" else "a CPU with bf16 units or a GPU"
        reasons.append(f"only {steps} steps (< {MIN_STEPS}): expect an under-trained model; give more minutes or "
                       f"{faster}")
    validations = 1 + ((steps - steps_done) // steps_per_epoch) // every if every < 10**9 else 1
    return Plan(budget_minutes=budget.seconds / 60 if budget.seconds else None, cpu=cpu_name(), cpu_flags=cpu_flags(),
                threads=torch.get_num_threads(), step_seconds=round(step_seconds, 3),
                validation_seconds=round(validation_seconds, 1), steps_planned=int(steps),
                validations_planned=int(validations), validate_every=int(min(every, 10**6)), reasons=reasons,
                **context)


def validation_reason(cost: dict) -> str:
    """Why validations run through the backend they do, from `ValidationCost.to_dict()`."""
    case = cost["case_seconds"]
    text = (f"validation through {cost['backend']}: {case[cost['backend']]:.2f} s for the timed case, "
            f"x{cost['repeats']:g} for its windows")
    if "openvino" in case:
        verdict = "pays" if cost["backend"] == "openvino" else "does not pay"
        text += (f"; OpenVINO ({case['openvino']:.2f} s a case + {cost['convert_seconds']:.1f} s to convert each "
                 f"validation's weights, torch {case['torch']:.2f} s) {verdict}")
    return text


# ------------------------------------------------------------------------- the network for the budget


def measure_step(plan, task, device, precision: str, steps: int = 3, channels_last: bool = False) -> float:
    """Median seconds of a training step of the network `plan` on random patches, after a warm-up step.

    What a step costs depends on the shapes, not on the voxels, so random patches measure it before
    any case is read.
    """
    import numpy as np
    import torch

    from medseg.model.networks import build_network
    from medseg.runtime import prepare_network
    from medseg.train.steps import make_loss, make_optimizer, train_step

    network = prepare_network(build_network(plan), device, precision, training=True, channels_last=channels_last)
    optimizer, loss_fn = make_optimizer(task, network), make_loss(task, plan)
    shape = (task.schedule.batch_size, plan.in_channels, *plan.patch_size)
    batch = {"image": torch.randn(shape), "label": torch.randint(0, plan.out_channels, (shape[0], 1, *shape[2:]))}
    seconds = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        train_step(network, batch, loss_fn, optimizer, task, device, precision)
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds[1:]))


def choose_width(task, plan_for, budget_seconds: float, device, precision: str) -> tuple[object, dict]:
    """The widest network that gets `schedule.target_steps` steps done inside the budget.

    Candidates are the task's filters and half of them (at least 4 per level; narrower was not tried on
    real data); each is timed
    (`measure_step`) on this machine, in this precision, the widest first. What time is left for steps
    is estimated as the budget less `VALIDATION_SHARE` for validation and 5% for preprocessing (the plan
    made after the first epoch then counts both as measured). No candidate reaches the target: the
    fastest serves.

    Args:
        plan_for: filters -> the `NetworkPlan` of a network with those filters.
    Returns:
        (the chosen plan, the record for plan.json: filters, seconds per step of each, the reason).
    """
    target = task.schedule.target_steps
    usable = budget_seconds * (1 - VALIDATION_SHARE - 0.05)
    widths = [tuple(max(4, f // k) for f in task.network.filters) for k in (1, 2)]
    measured, chosen = {}, None
    for filters in dict.fromkeys(widths):
        plan = plan_for(filters)
        measured[str(list(filters))] = round(measure_step(plan, task, device, precision), 3)
        chosen = plan
        if usable / measured[str(list(filters))] >= target:
            break
    steps = int(usable / measured[str(list(chosen.filters))])
    reached = "reaches" if steps >= target else "is the fastest and still falls short of"
    reason = (f"filters {list(chosen.filters)}: ~{steps} steps in {budget_seconds / 60:g} min at "
              f"{measured[str(list(chosen.filters))]:.2f} s a step {reached} the {target} the task asks for")
    return chosen, {"filters": list(chosen.filters), "step_seconds": measured, "reason": reason}


LAYOUT_GAIN = 1.05  # channels-last is kept only where it makes a step at least this much faster


def choose_layout(plan, task, device, precision: str) -> dict:
    """Whether training runs with channels-last weights: timed on this machine, in this precision.

    Which layout oneDNN runs faster depends on the CPU and the precision, so it is measured, not
    assumed. On a Xeon with AMX (headneck UNet, batch 2 of 64x64x80, one thread) channels-last made an
    fp32 step 1.23x faster (0.62 s against 0.76 s) and a bf16 step 1.7x slower (0.74 s against 0.43 s).
    Costs eight training steps at the start of a run; GPUs keep the default layout.
    """
    if device.type != "cpu":
        return {"channels_last": False, "reason": f"{device.type}: the default layout"}
    seconds = {name: round(measure_step(plan, task, device, precision, channels_last=flag), 3)
               for name, flag in (("contiguous", False), ("channels_last", True))}
    faster = seconds["contiguous"] >= LAYOUT_GAIN * seconds["channels_last"]
    chosen = "channels_last" if faster else "contiguous"
    return {"channels_last": faster, "step_seconds": seconds,
            "reason": f"{chosen} layout: {seconds[chosen]:.2f} s a step in {precision} against "
                      f"{seconds['contiguous' if faster else 'channels_last']:.2f} s"}
