"""medseg.planar: 2D images (PNG, TIFF, 2D NIfTI) through medseg as (X, Y, 1) volumes, from reading to the
mask on the input's own 2D grid, with `dimensions: 2` in the task file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli import main
from medseg.errors import InputError
from medseg.io import Grid, read_image, read_label, write_label_map
from medseg.planar import png_holds

TASK = """\
name: nuclei
dimensions: 2
modality: MR
channels: [grey]
labels: {1: nucleus}
spacing: [1.0, 1.0]
patch_size: [32, 32]
intensity: {normalize: image}
sampling: {samples_per_volume: 2, queue_length: 4}
augmentation: {flip: {p: 0.5, axes: [LR, AP]}, affine: {p: 0.3}}
network: {name: unet, filters: [4, 8]}
optimizer: {name: adamw, lr: 0.01, weight_decay: 0.0}
schedule: {epochs: 2, steps_per_epoch: 3, batch_size: 2, validate_every: 2}
inference: {sw_batch_size: 2}
"""


def cells(seed: int, shape=(40, 48)) -> tuple[np.ndarray, np.ndarray]:
    """A (rows, columns) uint8 picture of bright discs on a dark noisy background, and its label map."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    labels = np.zeros(shape, np.uint8)
    for _ in range(4):
        r, c, radius = rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8), rng.integers(3, 6)
        labels[(rows - r) ** 2 + (cols - c) ** 2 <= radius ** 2] = 1
    return (40 + 150 * labels + rng.normal(0, 10, shape)).clip(0, 255).astype(np.uint8), labels


def png(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=array.ndim == 3), str(path))
    return path


def placed_nifti(array: np.ndarray, path: Path) -> Path:
    """A 2D NIfTI with a pixel size, an origin and its axes swapped: geometry a PNG could not hold."""
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing((0.8, 0.6))
    image.SetOrigin((12.5, -3.0))
    image.SetDirection((0.0, 1.0, 1.0, 0.0))
    sitk.WriteImage(image, str(path))
    return path


# ------------------------------------------------------------------------------------------ reading


def test_grey_png_is_one_channel_of_one_slice(tmp_path):
    picture, labels = cells(0)
    image, grid = read_image(png(picture, tmp_path / "a.png"), dimensions=2)
    assert image.shape == (1, 48, 40, 1)  # (C, X = columns, Y = rows, 1)
    assert np.array_equal(image[0, :, :, 0], picture.T)
    assert grid.spacing == (1.0, 1.0, 1.0) and grid.origin == (0.0, 0.0, 0.0) and png_holds(grid)
    label, label_grid = read_label(png(labels, tmp_path / "a_label.png"), dimensions=2)
    assert label.shape == (48, 40, 1) and label.dtype == np.uint8 and label_grid.matches(grid)


def test_rgb_and_rgba_pngs_are_three_channels(tmp_path):
    picture = cells(1)[0]
    rgb = np.stack([picture, picture // 2, 255 - picture], -1)
    image, _ = read_image(png(rgb, tmp_path / "rgb.png"), dimensions=2)
    assert image.shape == (3, 48, 40, 1)
    assert np.array_equal(image[2, :, :, 0], (255 - picture).T)
    rgba = np.concatenate([rgb, np.full((*picture.shape, 1), 255, np.uint8)], -1)
    assert read_image(png(rgba, tmp_path / "rgba.png"), dimensions=2)[0].shape == (3, 48, 40, 1)  # alpha dropped
    with pytest.raises(InputError, match=r"rgb\.png: a label map needs one value per pixel, got 3"):
        read_label(tmp_path / "rgb.png", dimensions=2)


def test_2d_nifti_keeps_its_geometry_in_and_out(tmp_path):
    path = placed_nifti(cells(2)[0], tmp_path / "placed.nii.gz")
    _, grid = read_image(path, dimensions=2)
    assert grid.shape == (48, 40, 1) and grid.spacing[:2] == pytest.approx((0.8, 0.6))
    assert grid.origin == (12.5, -3.0, 0.0) and not png_holds(grid)
    written = sitk.ReadImage(str(write_label_map(np.ones(grid.shape, np.uint8), grid, tmp_path / "mask.nii.gz")))
    original = sitk.ReadImage(str(path))
    assert written.GetDimension() == 2 and written.GetSize() == original.GetSize()
    assert written.GetSpacing() == pytest.approx(original.GetSpacing())
    assert written.GetOrigin() == original.GetOrigin() and written.GetDirection() == original.GetDirection()


def test_a_3d_task_refuses_a_2d_image_and_a_2d_task_a_3d_one(tmp_path):
    path = png(cells(3)[0], tmp_path / "slide.png")
    with pytest.raises(InputError, match=r"slide\.png: expected a 3D image, got a 2D image of size \(48, 40\) "
                                         r"\(a task for 2D images says `dimensions: 2`\)$"):
        read_image(path)
    volume = tmp_path / "volume.nii.gz"
    write_label_map(np.zeros((8, 6, 5), np.uint8), Grid((8, 6, 5), (1.0,) * 3, (0.0,) * 3, tuple(np.eye(3).ravel())),
                    volume)
    with pytest.raises(InputError, match=r"volume\.nii\.gz: expected a 2D image \(the task has `dimensions: 2`\), "
                                         r"got a 3D image of size \(8, 6, 5\)"):
        read_label(volume, dimensions=2)


# ------------------------------------------------------------------------- train, predict, evaluate


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """An MSD dataset of four PNG cases, its 2D task file, and a tiny 2D U-Net trained on it via the CLI."""
    root = tmp_path_factory.mktemp("nuclei")
    data, entries = root / "data", []
    for i in range(4):
        picture, labels = cells(10 + i)
        png(picture, data / "imagesTr" / f"n{i}.png")
        png(labels, data / "labelsTr" / f"n{i}.png")
        entries.append({"image": f"./imagesTr/n{i}.png", "label": f"./labelsTr/n{i}.png"})
    (data / "dataset.json").write_text(json.dumps({"name": "nuclei", "training": entries}))
    task = root / "nuclei.yaml"
    task.write_text(TASK)
    assert main(["check-dataset", str(data), "--task", str(task), "-o", str(root / "fp.json")]) == 0
    assert main(["train", "--task", str(task), "--data", str(data), "--out", str(root / "run"), "--folds", "2"]) == 0
    return root, task, root / "run"


def test_the_model_folder_records_a_2d_network(trained):
    config = json.loads((trained[2] / "config.json").read_text())
    assert config["task"]["dimensions"] == 2 and config["network"]["dimensions"] == 2
    assert config["network"]["patch_size"] == [32, 32, 1]


def test_predict_writes_masks_on_each_inputs_2d_grid(trained, tmp_path):
    run = trained[2]
    inputs = [png(cells(20)[0], tmp_path / "in" / "slide.png"), placed_nifti(cells(21)[0], tmp_path / "in" / "placed.nii.gz")]
    out = tmp_path / "out"
    assert main(["predict", *map(str, inputs), "-m", str(run), "-o", str(out), "--backend", "torch"]) == 0
    for path, case in zip(inputs, ("slide", "placed")):
        original, mask = sitk.ReadImage(str(path)), sitk.ReadImage(str(out / f"{case}_seg.nii.gz"))
        assert mask.GetDimension() == 2 and mask.GetSize() == original.GetSize()
        assert mask.GetSpacing() == pytest.approx(original.GetSpacing())
        assert mask.GetOrigin() == original.GetOrigin() and mask.GetDirection() == original.GetDirection()
        assert (out / f"{case}_overlay.png").is_file() and not (out / f"{case}_axial.png").exists()
    as_png = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "slide_seg.png")))
    assert np.array_equal(as_png, sitk.GetArrayFromImage(sitk.ReadImage(str(out / "slide_seg.nii.gz"))))
    assert not (out / "placed_seg.png").exists()  # a PNG cannot hold its origin and swapped axes
    organs = json.loads((out / "placed_volumes.json").read_text())["organs"]["nucleus"]
    assert organs["area_mm2"] == pytest.approx(organs["voxels"] * 0.8 * 0.6)


def test_evaluate_scores_2d_predictions_against_the_dataset(trained, tmp_path):
    root, task, run = trained
    data, out = root / "data", tmp_path / "pred"
    assert main(["predict", str(data / "imagesTr"), "-m", str(run), "-o", str(out), "--backend", "torch",
                 "--no-overlays"]) == 0
    assert main(["evaluate", "--pred", str(out), "--ref", str(data), "--task", str(task), "-o", str(tmp_path / "ev")]) == 0
    rows = (tmp_path / "ev" / "metrics.csv").read_text()
    assert rows.count("area_ref_mm2") == 4 and "volume_ref_ml" not in rows  # 4 cases: PNG copies not scored twice
