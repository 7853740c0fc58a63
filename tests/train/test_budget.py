"""medseg.train.budget: a budget that means wall-clock, and the plan made for it."""

from __future__ import annotations

import csv
import json
import time

import pytest

from medseg.train import TrainOptions, fit
from medseg.runtime import cpu_flags
from medseg.train.budget import VALIDATION_SHARE, Budget, make_plan


def test_the_reserve_counts_as_spent():
    budget = Budget(100.0, used_before=40.0, reserve=10.0)
    assert budget.fraction() == pytest.approx(0.5, abs=1e-3)
    assert budget.fits(49.0) and not budget.fits(51.0)
    assert Budget(None).fraction() == 0.0 and Budget(None).fits(1e9)


@pytest.mark.parametrize("validation_seconds", [5.0, 30.0, 200.0])
def test_plan_fits_steps_and_validations_in_the_budget(validation_seconds):
    budget = Budget(600.0, used_before=60.0, reserve=validation_seconds)
    plan = make_plan(budget, epochs_left=1000, steps_per_epoch=50, step_seconds=1.0,
                     validation_seconds=validation_seconds, validate_every=1,
                     context={"device": "cpu", "precision": "fp32", "preprocessing_seconds": 60.0, "validation_cases": 5})
    intermediate = plan.validations_planned - 1
    assert intermediate * validation_seconds <= VALIDATION_SHARE * 600 + 1e-6
    spent = 60 + plan.steps_planned * 1.0 + plan.validations_planned * validation_seconds
    assert 600 - 50 - validation_seconds <= spent <= 600  # the steps fill the budget, to an epoch
    assert plan.steps_planned < 1000 * 50 and plan.validate_every >= 1
    assert json.loads(json.dumps(plan.to_dict()))["step_seconds"] == 1.0


def test_a_short_budget_says_the_model_will_be_under_trained():
    plan = make_plan(Budget(60.0), 100, 50, 1.0, 1.0, 1, {"device": "cpu", "precision": "fp32",
                                                          "preprocessing_seconds": 0.0, "validation_cases": 1})
    assert any("under-trained" in reason for reason in plan.reasons)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu avx2 avx512f sse\n")
    assert cpu_flags(cpuinfo) == ["avx2", "avx512f"]
    assert cpu_flags(tmp_path / "missing") == []


def test_a_budgeted_run_ends_inside_its_wall_clock_budget(tiny_dataset, tmp_path):
    """Preprocessing, steps, validations and the final model together stay inside --max-minutes."""
    root, task = tiny_dataset
    budget_seconds = 12.0
    start = time.perf_counter()
    folder = fit(TrainOptions(task=task, data=root, out=tmp_path / "run", epochs=10_000,
                              max_minutes=budget_seconds / 60))
    wall = time.perf_counter() - start
    assert wall <= budget_seconds * 1.15 + 2.0, f"{wall:.1f} s for a {budget_seconds:.0f} s budget"
    plan = json.loads((folder / "plan.json").read_text())
    assert plan["budget_minutes"] == pytest.approx(0.2) and plan["steps_planned"] > 0
    assert plan["step_seconds"] > 0 and plan["validation_cases"] >= 1
    with (folder / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert int(rows[-1]["step"]) >= 10  # it trained, and stopped by time, not by epochs
    assert rows[-1]["mean_dice"] != "" and float(rows[-1]["validation_seconds"]) > 0  # the final validation
    assert sum(float(r["step_seconds"]) + float(r["validation_seconds"]) for r in rows) < wall
    assert (folder / "best.pt").is_file()


@pytest.mark.parametrize("target, expected", [(1, (4, 8, 16)), (10**9, (4, 4, 8))])
def test_the_budget_chooses_the_widest_network_that_trains_far_enough(tiny_dataset, target, expected):
    from dataclasses import replace

    import torch

    from medseg.config import load_task
    from medseg.model.networks import plan_network
    from medseg.train.budget import choose_width

    task = load_task(tiny_dataset[1])
    task = replace(task, schedule=replace(task.schedule, target_steps=target))
    plan_for = lambda filters: plan_network(replace(task.network, filters=filters), 1, task.num_classes,  # noqa: E731
                                            task.patch_size, (3.0, 3.0, 3.0))
    plan, record = choose_width(task, plan_for, 60.0, torch.device("cpu"), "fp32")
    assert plan.filters == expected and record["filters"] == list(expected)
    assert all(seconds > 0 for seconds in record["step_seconds"].values())
    assert ("falls short" in record["reason"]) == (target > 1)


def test_the_training_layout_is_the_one_measured_faster(tiny_dataset, tmp_path):
    """Both layouts are timed; the run trains, saves and reloads in the chosen one."""
    import torch

    from medseg.model.folder import read_run_config
    from medseg.train.budget import LAYOUT_GAIN

    root, task = tiny_dataset
    folder = fit(TrainOptions(task=task, data=root, out=tmp_path / "run", epochs=1, precision="fp32"))
    config = read_run_config(folder)
    layout = config.network_choice["layout"]
    seconds = layout["step_seconds"]
    assert set(seconds) == {"contiguous", "channels_last"} and min(seconds.values()) > 0
    assert layout["channels_last"] == (seconds["contiguous"] >= LAYOUT_GAIN * seconds["channels_last"])
    assert config.channels_last == layout["channels_last"]
    assert ("channels_last layout" if config.channels_last else "contiguous layout") in layout["reason"]
    assert "layout" in json.loads((folder / "plan.json").read_text())["network"]
    state = torch.load(folder / "best.pt", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# The 45-minute head-and-neck run (one thread, bf16): 51 s preprocessing + a 31 s first epoch, 0.578 s a
# step, 50 steps an epoch; validation measured 16.2 s for 5 cases on the full grid (3.24 s a case).
HEADNECK = {"device": "cpu", "precision": "bf16", "preprocessing_seconds": 51.0, "validation_cases": 12}


def headneck_plan(validation_seconds: float, validate_every: int, cost: dict | None = None):
    budget = Budget(45 * 60.0, used_before=82.0, reserve=validation_seconds)
    context = dict(HEADNECK, validation=cost or {})
    return make_plan(budget, epochs_left=199, steps_per_epoch=50, step_seconds=0.578,
                     validation_seconds=validation_seconds, validate_every=validate_every, context=context,
                     steps_done=50)


def test_a_cheaper_measured_validation_buys_validations_and_steps():
    """Twelve cases at the old full-grid cost (12 x 3.24 s) against the measured body-box cost
    (`measure_validation` on hn_002..hn_013: 1.9 s for a 24-window case, x7.08 for the twelve cases' windows)."""
    from medseg.train.validation import ValidationCost

    cost = ValidationCost("torch", 7.08 * 1.9, {"torch": 1.9, "openvino": 1.45}, 4.7, 7.08)
    old, new = headneck_plan(12 * 3.24, 1), headneck_plan(cost.seconds, 1, cost.to_dict())
    assert new.validate_every < old.validate_every and new.validations_planned > old.validations_planned
    for plan, seconds in ((old, 12 * 3.24), (new, cost.seconds)):  # either way inside the validation share
        assert (plan.validations_planned - 1) * seconds <= VALIDATION_SHARE * 45 * 60 + 1e-6
    assert new.validation == cost.to_dict() and json.loads(json.dumps(new.to_dict()))["validation"]["backend"] == "torch"
    assert any("validation through torch" in r and "does not pay" in r for r in new.reasons)
    assert not any("validation through" in r for r in old.reasons)  # not measured: no such reason
    # the task's validate_every (20 for headneck) is a floor: the time saved goes to steps
    old, new = headneck_plan(12 * 3.24, 20), headneck_plan(cost.seconds, 20, cost.to_dict())
    assert new.validate_every == old.validate_every == 20 and new.steps_planned > old.steps_planned
