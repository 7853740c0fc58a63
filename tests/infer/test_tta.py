"""medseg.infer.tta: mirrored copies averaged, left organs kept on the left."""

from __future__ import annotations

import numpy as np
from conftest import SideAware, make_grid, oracle_predictor


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
