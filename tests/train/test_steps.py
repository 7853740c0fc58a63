"""medseg.train.steps: the schedule."""

from __future__ import annotations

import pytest

from medseg.config import load_task
from medseg.train.steps import learning_rate


def test_poly_schedule_reaches_zero():
    task = load_task("prostate")
    assert learning_rate(task, 0.0) == pytest.approx(task.optimizer.lr)
    assert learning_rate(task, 0.5) == pytest.approx(task.optimizer.lr * 0.5 ** 0.9)
    assert learning_rate(task, 1.0) == 0.0
