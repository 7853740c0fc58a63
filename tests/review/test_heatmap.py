"""The uncertainty picture: the overlay's slice unchanged where the model is sure, heat where it is not."""

from __future__ import annotations

import numpy as np
from conftest import blob_case, make_grid
from PIL import Image

from medseg.config import load_task
from medseg.infer.predictor import Segmentation
from medseg.review.heatmap import HEAT_FULL, PICTURE_SIZE, uncertainty_picture, write_uncertainty_picture
from medseg.review.render import render_slice

COLORS = {1: (230, 25, 75), 2: (255, 225, 25)}


def test_no_uncertainty_is_the_plain_slice_and_full_uncertainty_is_red():
    image = np.linspace(-100, 200, 40 * 30).reshape(40, 30)
    labels = np.zeros((40, 30), np.uint8)
    labels[10:20, 5:15] = 1
    plain = render_slice(image, labels, COLORS, (40, 400), (1.0, 1.0))
    calm = uncertainty_picture(image, labels, np.zeros((40, 30)), COLORS, (40, 400), (1.0, 1.0))
    np.testing.assert_array_equal(calm, plain)
    doubt = np.zeros((40, 30))
    doubt[25:35, 10:20] = HEAT_FULL
    hot = uncertainty_picture(image, labels, doubt, COLORS, (40, 400), (1.0, 1.0))
    assert hot.shape == plain.shape
    red = hot[28:32, 13:17].astype(int)
    assert (red[..., 0] > 200).all() and (red[..., 1] < 80).all() and (red[..., 2] < 80).all()
    np.testing.assert_array_equal(hot[:20], plain[:20])  # untouched where the model is sure


def test_the_picture_shows_the_axial_slice_holding_most_uncertainty(tmp_path):
    task = load_task("prostate")
    grid = make_grid("PLI", shape=(40, 36, 24), spacing=(1.2, 1.1, 2.5))
    image, labels = blob_case(grid, seed=1)
    uncertainty = np.zeros(grid.shape, np.float32)
    uncertainty[labels == 2] = 0.5  # the bladder is where the model doubts
    seg = Segmentation(labels, grid, task.label_names, uncertainty=uncertainty)
    path = write_uncertainty_picture((image[None], grid), seg, task, tmp_path, "case")
    assert path == tmp_path / "case_uncertainty.png"
    picture = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert picture.shape[1] <= PICTURE_SIZE[0] + 1 and picture.shape[0] <= PICTURE_SIZE[1] + 1
    heat = (picture[..., 0] > 200) & (picture[..., 1] < 100) & (picture[..., 2] < 60)
    assert heat.sum() > 100  # the bladder's slice, covered in red
