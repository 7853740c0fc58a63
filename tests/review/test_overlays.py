"""Overlay PNGs: the pure slice renderer, radiological orientation for every voxel order, files."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import blob_case, make_grid

from medseg.config import load_task
from medseg.errors import InputError
from medseg.io import Grid, from_array, to_array
from medseg.review.montage import THUMB_SIZE, render_view, thumbnail
from medseg.review.overlays import legend_entries, write_overlays
from medseg.review.render import render_slice
from medseg.review.views import (
    VIEWS,
    canonical,
    choose_slices,
    view_slice,
    view_spacing,
)

RED, GREEN = (230, 25, 75), (60, 180, 75)
AXIAL, CORONAL, SAGITTAL = VIEWS


@pytest.fixture(scope="module")
def task():
    return load_task("prostate")  # organ 4 = femoral_head_left, organ 5 = femoral_head_right


def disc(shape, centre, radius) -> np.ndarray:
    rows, cols = np.indices(shape)
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def colour_pixels(rgb: np.ndarray, color) -> np.ndarray:
    return np.all(rgb == np.asarray(color, np.uint8), axis=-1)


# ----------------------------------------------------------------------------------- pure slice


def test_render_slice_returns_uint8_rgb_of_the_slice_size():
    rgb = render_slice(np.zeros((10, 20)), np.zeros((10, 20), np.uint8), {}, (40, 400), (1.0, 1.0))
    assert rgb.dtype == np.uint8 and rgb.shape == (10, 20, 3)
    assert render_slice(np.zeros((10, 20)), np.zeros((10, 20), np.uint8), {}, (40, 400), (1.0, 1.0),
                        pixel_mm=0.5).shape == (20, 40, 3)


@pytest.mark.parametrize("spacing, shape", [
    pytest.param((3.0, 1.0), (30, 20, 3), id="thick-rows-stretched"),
    pytest.param((1.0, 2.0), (10, 40, 3), id="wide-columns-stretched"),
])
def test_render_slice_pixels_are_square_in_mm(spacing, shape):
    assert render_slice(np.zeros((10, 20)), np.zeros((10, 20), np.uint8), {}, (0, 100), spacing).shape == shape


def test_window_maps_level_to_mid_grey_and_edges_to_black_and_white():
    image = np.array([[40.0, -160.0, 240.0, -1000.0, 3000.0]])
    rgb = render_slice(image, np.zeros(image.shape, np.uint8), {}, (40, 400), (1.0, 1.0))
    assert rgb[0, :, 0].tolist() == [128, 0, 255, 0, 255]
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_outline_pixels_have_the_organ_colour_and_the_inside_is_tinted():
    labels = disc((60, 60), (30, 30), 15).astype(np.uint8)
    rgb = render_slice(np.full((60, 60), -1000.0), labels, {1: RED}, (40, 400), (1.0, 1.0))
    rows, cols = np.nonzero(colour_pixels(rgb, RED))
    distance = np.hypot(rows - 30, cols - 30)
    assert rows.size > 2 * np.pi * 15 and distance.min() > 12 and distance.max() <= 15.5
    assert tuple(rgb[30, 30]) == tuple(round(c * 0.25) for c in RED)  # translucent fill on black
    assert not rgb[5, 5].any()  # background stays black


def test_reference_outline_is_dashed_in_the_organ_colour():
    reference = disc((80, 80), (40, 40), 25).astype(np.uint8)
    rgb = render_slice(np.full((80, 80), -1000.0), np.zeros((80, 80), np.uint8), {1: GREEN}, (40, 400), (1.0, 1.0),
                       reference2d=reference)
    rows, cols = np.nonzero(colour_pixels(rgb, GREEN))
    assert np.abs(np.hypot(rows - 40, cols - 40) - 25).max() <= 2.5
    angles = np.unique(np.round(np.degrees(np.arctan2(rows - 40, cols - 40))).astype(int))
    assert 0.3 < angles.size / 360 < 0.8  # dashes: part of the circle, not all of it


def test_render_slice_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        render_slice(np.zeros((4, 4)), np.zeros((4, 5), np.uint8), {}, (40, 400), (1.0, 1.0))


# ------------------------------------------------------------------------------ orientation


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "PLI", "oblique"])
def test_canonical_matches_dicomorient(orientation):
    grid = make_grid(orientation)
    _, labels = blob_case(grid)
    array, canon = canonical(labels, grid)
    expected = sitk.DICOMOrient(from_array(labels, grid), "LPS")
    assert np.array_equal(array, to_array(expected))
    assert canon.matches(Grid.of(expected))


def organ_centroid_column(tiles, color) -> list[float]:
    """Column of the organ's outline centroid, as a fraction of the tile width, in every tile showing it."""
    found = []
    for tile in tiles:
        cols = np.nonzero(colour_pixels(tile.rgb, color))[1]
        if cols.size:
            found.append(cols.mean() / tile.rgb.shape[1])
    return found


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "PLI", "oblique"])
def test_patient_left_is_on_the_image_right_in_axial_and_coronal_views(write_case, task, orientation):
    from medseg.io import read_image, read_label

    image_path, label_path, _ = write_case(orientation=orientation)
    image, grid = read_image(image_path)
    labels, _ = read_label(label_path)
    image_c, grid_c = canonical(image[0], grid)
    labels_c = canonical(labels, grid)[0]
    colors = {label.id: label.color for label in task.labels}
    for view in (AXIAL, CORONAL):
        tiles = render_view(image_c, labels_c, grid_c, view, colors, (40, 400))
        left, right = organ_centroid_column(tiles, colors[4]), organ_centroid_column(tiles, colors[5])
        assert left and min(left) > 0.5, f"{view.name}: left organ not on the image right"
        assert right and max(right) < 0.5, f"{view.name}: right organ not on the image left"


@pytest.mark.parametrize("orientation", ["RAS", "PLI"])
def test_sagittal_shows_anterior_left_and_superior_up(write_case, orientation):
    _, labels = blob_case(make_grid(orientation))
    labels_c, grid_c = canonical(labels, make_grid(orientation))
    # organ 3 sits posterior (+y in LPS) of organ 1; organ 2 superior (+z) of organ 1
    x = int(np.mean(np.nonzero(labels_c == 1)[0]))
    picture = view_slice(labels_c, SAGITTAL, x)
    rows = {k: np.nonzero(picture == k)[0].mean() for k in (1, 2)}
    cols = {k: np.nonzero(view_slice(labels_c, SAGITTAL, int(np.mean(np.nonzero(labels_c == k)[0]))) == k)[1].mean()
            for k in (1, 3)}
    assert cols[3] > cols[1] and rows[2] < rows[1]


def test_thick_slices_give_taller_coronal_tiles():
    def coronal_aspect(spacing):
        grid = Grid((20, 20, 10), spacing, (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
        labels = np.zeros(grid.shape, np.uint8)
        labels[5:15, 5:15, 3:7] = 1
        tile = render_view(np.zeros(grid.shape), labels, grid, CORONAL, {1: RED}, (40, 400))[0].rgb
        assert view_spacing(spacing, CORONAL) == (spacing[2], spacing[0])
        return tile.shape[0] / tile.shape[1]

    assert coronal_aspect((1.0, 1.0, 1.0)) == pytest.approx(0.5, abs=0.02)  # 10 mm tall, 20 mm wide
    assert coronal_aspect((1.0, 1.0, 3.0)) == pytest.approx(1.5, abs=0.02)  # 30 mm tall, 20 mm wide


# ---------------------------------------------------------------------------- slice choice


def test_slices_cover_every_organ_and_the_largest_disagreement():
    prediction = np.zeros((10, 10, 60), np.uint8)
    prediction[3:7, 3:7, 5:50] = 1
    prediction[4:6, 4:6, 52:54] = 2  # a small organ the even spread would miss
    reference = prediction.copy()
    reference[2:8, 2:8, 20] = 1  # the slice where they disagree most
    chosen = dict(choose_slices(prediction, 2, count=8, reference=reference))
    assert len(chosen) == 8
    assert chosen[20] == 6 * 6 - 4 * 4  # differing voxels: the reference's ring around the prediction
    assert sum(n > 0 for n in chosen.values()) == 1  # no other slice differs
    assert any(52 <= s <= 53 for s in chosen)
    assert all(5 <= s <= 53 for s in chosen)


def test_an_organ_crossed_only_at_its_edge_gets_a_slice_through_its_centre():
    labels = np.zeros((6, 6, 40), np.uint8)
    labels[2:4, 2:4, 0:30] = 1
    labels[2:4, 2:4, 30:40] = 2  # the even spread of 2 slices hits 9 and 29: organ 2 only at its edge
    chosen = [s for s, _ in choose_slices(labels, 2, count=2)]
    assert any(32 <= s <= 37 for s in chosen), chosen


def test_slices_are_denser_where_more_organs_meet():
    labels = np.zeros((50, 4, 4), np.uint8)
    labels[0:10, 0, 0] = 1  # one organ on each side, three across the middle: a sagittal pelvis
    labels[20:30, 1, 1], labels[20:30, 2, 2], labels[20:30, 3, 3] = 2, 3, 4
    labels[40:50, 0, 0] = 5
    assert [s for s, _ in choose_slices(labels, 0, count=5)] == [5, 21, 25, 28, 45]


def test_spread_slices_keep_clear_of_the_disagreement_slices():
    prediction = np.zeros((4, 4, 40), np.uint8)
    prediction[1:3, 1:3, :] = 1
    reference = prediction.copy()
    reference[0, 0, [14, 25]] = 1  # the even spread alone would take 15 and 25
    chosen = [s for s, _ in choose_slices(prediction, 2, count=4, reference=reference)]
    assert len(chosen) == 4 and 14 in chosen and 25 in chosen
    assert min(np.diff(chosen)) >= 40 // 8


def test_empty_mask_still_gives_slices_over_the_whole_volume():
    chosen = choose_slices(np.zeros((4, 4, 40), np.uint8), 2, count=4)
    assert [s for s, _ in chosen] == [5, 15, 25, 35]


def shifted_pair(depth: int = 30):
    """A 10 mm-cube organ on a 1 x 1 x 2 mm grid, and a reference that differs only on slices 20-21."""
    grid = Grid((20, 20, depth), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    prediction = np.zeros(grid.shape, np.uint8)
    prediction[5:15, 5:15, 5:25] = 1
    reference = prediction.copy()
    reference[5:15, 5:15, 20:22] = 0  # 2 slices x 100 voxels x 1 mm^2 missed in the reference
    return grid, prediction, reference


def test_axial_tiles_run_head_to_feet_and_name_the_disagreement_in_cm2():
    grid, prediction, reference = shifted_pair()
    tiles = render_view(np.zeros(grid.shape), prediction, grid, AXIAL, {1: RED}, (40, 400), reference=reference)
    heights = [float(t.position.split()[1]) for t in tiles]
    assert all(t.position.startswith("S ") for t in tiles) and heights == sorted(heights, reverse=True)
    notes = [t.note for t in tiles if t.note]
    assert notes and notes[0] == "largest disagreement: 1.0 cm2"  # 100 voxels of 1 x 1 mm


def test_thumbnail_shows_the_slice_where_reference_and_prediction_differ_most():
    grid, prediction, reference = shifted_pair()
    rgb = thumbnail(np.zeros(grid.shape), prediction, grid, {1: RED}, (40, 400), reference=reference)
    assert rgb.dtype == np.uint8 and rgb.shape == (300, 300, 3)  # 20 x 20 mm at 1/15 mm a pixel
    # on slices 20-21 only the prediction's outline is drawn: inside the organ (pixels 75..224), while the
    # reference's dashed outline would lie just outside it
    rows, cols = np.nonzero(colour_pixels(rgb, RED))
    assert rows.size and rows.min() >= 75 and rows.max() <= 224 and cols.min() >= 75 and cols.max() <= 224
    without_reference = thumbnail(np.zeros(grid.shape), prediction, grid, {1: RED}, (40, 400))
    assert without_reference.shape == rgb.shape


def test_legend_names_each_organ_with_its_volume_in_ml_and_its_dice(task):
    prediction = np.zeros((10, 10, 10), np.uint8)
    prediction[0:2, 0:2, 0:2] = 1  # 8 voxels of 0.5 mL = 4.0 mL
    reference = np.zeros_like(prediction)
    reference[0:2, 0:2, 0:1] = 1  # 4 voxels: Dice 2 * 4 / (8 + 4) = 0.67
    colors, lines, mean = legend_entries(task, prediction, reference, voxel_ml=0.5)
    assert lines[0] == (colors[1], "prostate: 4.0 mL (ref 2.0), Dice 0.67")
    assert lines[1][1] == "bladder: 0 mL (ref 0), Dice n/a"  # absent from both: no Dice
    assert mean == pytest.approx(2 / 3)
    assert legend_entries(task, prediction, None, 0.5)[1][0][1] == "prostate: 4.0 mL"


def test_legend_of_microscopy_areas_in_um2_prediction_and_reference_in_one_unit():
    cells = load_task("cells")
    prediction = np.zeros((20, 20, 1), np.uint8)
    prediction[0:10, 0:10] = 1  # 100 pixels of 0.25 um2 (0.5 um pixels): 25 um2
    reference = np.zeros_like(prediction)
    reference[0:10, 0:12] = 1
    reference[15:20, 15:20] = 2  # the cell the prediction missed: 6.25 um2
    _, lines, _ = legend_entries(cells, prediction, reference, 0.0005 ** 2, "mm²")
    assert [text for _, text in lines] == ["nucleus: 25.0 um2 (ref 30.0), Dice 0.91",
                                           "cell: 0 um2 (ref 6.2), Dice 0.00"]  # the font has no µ or ²


def test_an_rgb_image_is_shown_in_colour(tmp_path):
    """A 2D RGB image (three channels): its overlay shows the colours, not the first channel in grey."""
    from PIL import Image

    grid = make_grid("LPS", shape=(40, 30, 1), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    image = np.zeros((3, *grid.shape), np.float32)
    image[0, :20] = 200.0  # left half red, right half green: colours the legend (the task's) does not use
    image[1, 20:] = 200.0
    task = load_task("cells")
    rgb = render_slice(np.moveaxis(image[..., 0], 0, -1), np.zeros((40, 30), np.uint8), {}, (100, 200), (1.0, 1.0))
    assert tuple(rgb[5, 5]) == (255, 0, 0) and tuple(rgb[35, 5]) == (0, 255, 0)
    (overlay, _) = write_overlays((image, grid), (np.zeros(grid.shape, np.uint8), grid), task, tmp_path, case="rgb")
    with Image.open(overlay) as png:
        pixels = np.asarray(png.convert("RGB")).reshape(-1, 3).astype(int)
    red = (pixels[:, 0] > 200) & (pixels[:, 1] < 60) & (pixels[:, 2] < 60)
    assert red.sum() > 1000 and ((pixels[:, 1] > 200) & (pixels[:, 0] < 60) & (pixels[:, 2] < 60)).sum() > 1000
    grey = write_overlays((image[:1], grid), (np.zeros(grid.shape, np.uint8), grid), task, tmp_path, case="grey")[0]
    with Image.open(grey) as png:
        pixels = np.asarray(png.convert("RGB")).reshape(-1, 3).astype(int)
    assert not ((pixels[:, 0] > 200) & (pixels[:, 1] < 60) & (pixels[:, 2] < 60)).any()  # one channel: grey


# ------------------------------------------------------------------------------------ files


def test_write_overlays_writes_three_small_pngs(write_case, task, tmp_path):
    from PIL import Image

    image_path, label_path, grid = write_case(orientation="RAS")
    _, labels = blob_case(grid)
    prediction = labels.copy()
    prediction[prediction == 3] = 0  # a missed organ: Dice 0 in the legend
    paths = write_overlays(image_path, (prediction, grid), task, tmp_path / "png", reference=label_path, case="c7")
    assert [p.name for p in paths] == ["c7_axial.png", "c7_coronal.png", "c7_sagittal.png", "c7_thumb.png"]
    for path in paths[:3]:
        with Image.open(path) as png:
            assert png.format == "PNG" and png.mode == "RGB" and png.size[0] == 1600
            png.verify()
        assert path.stat().st_size < 1_000_000
    with Image.open(paths[3]) as png:
        assert png.size[0] <= THUMB_SIZE[0] and png.size[1] <= THUMB_SIZE[1]
    assert not list((tmp_path / "png").glob(".*tmp*"))  # atomic writes leave no temporary file


def test_mask_on_another_grid_is_an_input_error_naming_both(write_case, task, tmp_path):
    image_path, _, grid = write_case(orientation="LPS")
    other = make_grid("RAS")
    with pytest.raises(InputError, match=r"the given mask array .*RAS.* is not on the grid of .*case_000\.nii\.gz"):
        write_overlays(image_path, (np.zeros(other.shape, np.uint8), other), task, tmp_path)


def test_cli_overlay_command(write_case, tmp_path):
    from medseg.cli import main

    image_path, label_path, _ = write_case(orientation="PLI")
    assert main(["overlay", str(image_path), str(label_path), "--out", str(tmp_path / "cli")]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == [
        "case_000_axial.png", "case_000_coronal.png", "case_000_sagittal.png", "case_000_thumb.png"]


def test_importing_overlay_does_not_import_plotting_libraries():
    code = "import sys, medseg.review.overlays; print(any(m.split('.')[0] in ('PIL', 'matplotlib') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


@pytest.mark.parametrize("out_shape", [(30, 45), (90, 200), (240, 75)], ids=["shrink", "enlarge", "mixed"])
def test_organ_window_holds_everything_drawn_for_the_organ(out_shape):
    """Drawing an organ only in its window gives the whole slice's picture: its interpolated mask and
    the outline 2 px beyond it lie inside the window, and the window's values are the whole's, cut."""
    from scipy import ndimage

    from medseg.review.render import _organ_window, _resize

    rng = np.random.default_rng(3)
    for _ in range(20):
        organ = ndimage.gaussian_filter(rng.random((60, 80)), 2) > 0.56
        if not organ.any():
            continue
        whole = _resize(organ, out_shape)
        window = _organ_window(organ, out_shape)
        part = tuple(slice(*span) for span in window)
        assert np.array_equal(_resize(organ, out_shape, window), whole[part])
        reach = ndimage.binary_dilation(whole >= 0.5, iterations=3)
        reach[part] = False
        assert not reach.any()
