"""medseg.infer.tta: mirrored copies averaged, left organs kept on the left."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import Oracle, SideAware, make_grid, oracle_predictor

from medseg.infer.tta import flips_for


def test_tta_keeps_left_organ_on_the_left():
    grid = make_grid("LPS", shape=(40, 30, 20), spacing=(1.0, 1.0, 1.0))
    image = np.zeros(grid.shape, np.float32)
    image[5:12, 10:20, 5:15] = 1.0  # LPS axis 0 points left: high index = patient's left
    image[28:35, 10:20, 5:15] = 1.0
    # one window covers the volume, so the fake network's "low half" is the volume's
    plain = oracle_predictor((1.0, 1.0, 1.0), SideAware(), patch=(40, 32, 24)).predict((image[None], grid))
    flipped = oracle_predictor((1.0, 1.0, 1.0), SideAware(), tta=True, patch=(40, 32, 24)).predict((image[None], grid))
    assert set(np.unique(plain.labels[28:35, 10:20, 5:15])) == {4}  # patient's left
    assert set(np.unique(plain.labels[5:12, 10:20, 5:15])) == {5}
    assert np.array_equal(plain.labels, flipped.labels)


class Counting(torch.nn.Module):
    """The oracle network, counting the windows it is given."""

    def __init__(self):
        super().__init__()
        self.oracle, self.windows = Oracle(), 0

    def forward(self, x):
        self.windows += x.shape[0]
        return self.oracle(x)


@pytest.mark.parametrize("shape, copies", [
    pytest.param((24, 20, 1), 3, id="2d-image-two-in-plane-mirrors"),
    pytest.param((24, 20, 8), 4, id="volume-three-mirrors"),
])
def test_tta_mirrors_only_axes_longer_than_one_voxel(shape, copies):
    assert flips_for(shape, tta=False) == [()]
    assert len(flips_for(shape, tta=True)) == copies
    grid = make_grid("RAS", shape=shape, spacing=(1.0, 1.0, 1.0))
    labels = np.zeros(shape, np.float32)
    labels[3:9, 4:15] = 2.0
    network = Counting()
    predictor = oracle_predictor((1.0, 1.0, 1.0), network, tta=True, patch=shape)  # one window per copy
    result = predictor.predict((labels[None], grid))
    assert network.windows == 2  # the prostate task trains left-right flips only: the scan and that mirror
    assert np.array_equal(result.labels, labels.astype(np.uint8))

@pytest.mark.parametrize("task, flips", [
    pytest.param("prostate", [(), (0,)], id="trained-left-right-only"),
    pytest.param("cells", [(), (0,), (1,)], id="trained-both-in-plane-axes"),
])
def test_tta_shows_the_model_only_the_mirrors_it_trained_on(task, flips):
    """A model trained with left-right flips alone never saw an upside-down scan: no head-foot copy."""
    from medseg.config import load_task

    assert flips_for((24, 20, 8), tta=True, axes=load_task(task).flip_axes()) == flips
    network = Counting()
    grid = make_grid("RAS", shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0))
    predictor = oracle_predictor((1.0, 1.0, 1.0), network, tta=True, patch=(16, 16, 16))  # the prostate task
    predictor.predict((np.zeros((1, 16, 16, 16), np.float32), grid))
    assert network.windows == 2  # the scan and its left-right mirror
