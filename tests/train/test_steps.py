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


def test_weight_average_follows_the_weights_and_gives_them_back():
    import torch

    from medseg.train.steps import WeightAverage

    network = torch.nn.Linear(2, 1)
    with torch.no_grad():
        network.weight.fill_(0.0)
    average = WeightAverage(network, decay=0.5)
    with torch.no_grad():
        network.weight.fill_(1.0)
    average.update(network)  # first update: decay min(0.5, 2/11) -> weight 1 - 2/11 of the new value
    assert torch.allclose(average.shadow["weight"], torch.full((1, 2), 9 / 11))
    with average.applied(network):
        assert torch.allclose(network.weight, torch.full((1, 2), 9 / 11))
    assert torch.allclose(network.weight, torch.ones(1, 2))  # its own weights again
    restored = WeightAverage(network, decay=0.5)
    restored.load(average.to_dict())
    assert restored.updates == 1 and torch.equal(restored.shadow["weight"], average.shadow["weight"])
