"""Instances from a class mask: touching objects split, the instance table hand-checked."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.infer.instances import (
    Splitting,
    instance_table,
    split_classes,
    split_instances,
    table_csv,
    write_instances,
)
from medseg.io import Grid


def _discs(shape, centres, radius, spacing=(1.0, 1.0)):
    x, y = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return np.any([(x - cx) ** 2 + (y - cy) ** 2 <= radius ** 2 for cx, cy in centres], axis=0)


def test_two_touching_discs_are_two_instances():
    mask = _discs((60, 40), [(20, 20), (37, 20)], 10)  # centres 1.7 radii apart: one blob with a neck
    from scipy import ndimage

    assert ndimage.label(mask)[1] == 1
    instances = split_instances(mask, (1.0, 1.0))
    assert instances.dtype == np.uint32 and set(np.unique(instances)) == {0, 1, 2}
    np.testing.assert_array_equal(instances > 0, mask)
    left, right = instances[20, 20], instances[37, 20]
    assert left != right and 0 not in (left, right)
    assert abs(int((instances == left).sum()) - int((instances == right).sum())) <= 12  # split at the neck


def test_an_ellipse_and_separate_discs_stay_whole():
    x, y = np.meshgrid(np.arange(80), np.arange(40), indexing="ij")
    ellipse = ((x - 30) / 25.0) ** 2 + ((y - 20) / 9.0) ** 2 <= 1
    assert split_instances(ellipse, (1.0, 1.0)).max() == 1
    apart = _discs((80, 40), [(15, 20), (60, 20)], 8)
    assert split_instances(apart, (1.0, 1.0)).max() == 2


def test_same_split_in_mm_on_a_2d_image_held_as_a_volume():
    """(X, Y, 1) with 0.5 um pixels, as a 2D image is inside medseg: the same two objects."""
    mask = _discs((60, 40), [(20, 20), (37, 20)], 10)
    flat = split_instances(mask[..., None], (0.0005, 0.0005, 1.0))
    assert flat.shape == (60, 40, 1) and flat.max() == 2
    np.testing.assert_array_equal(flat[..., 0], split_instances(mask, (1.0, 1.0)))


def test_touching_balls_in_anisotropic_3d():
    x, y, z = np.meshgrid(np.arange(40), np.arange(30), np.arange(12), indexing="ij", sparse=True)
    spacing = (1.0, 1.0, 2.5)  # thick slices: z in mm is 2.5 x the index
    balls = [((x - cx) ** 2 + (y - 15) ** 2 + ((z - 6) * 2.5) ** 2) <= 64 for cx in (12, 26)]
    instances = split_instances(balls[0] | balls[1], spacing)
    assert instances.max() == 2 and instances[12, 15, 6] != instances[26, 15, 6]


def test_seeds_closer_than_the_minimum_distance_are_one_object():
    mask = _discs((60, 40), [(20, 20), (37, 20)], 10)
    assert split_instances(mask, (1.0, 1.0), Splitting(radius_mm=10.0, min_distance_fraction=2.0)).max() == 1


def test_empty_mask_and_bad_spacing():
    assert split_instances(np.zeros((10, 10), bool), (1, 1)).max() == 0
    with pytest.raises(ValueError, match="spacing"):
        split_instances(np.ones((10, 10), bool), (1.0,))


def test_split_classes_numbers_on_across_classes():
    labels = np.zeros((60, 40), np.uint8)
    labels[_discs((60, 40), [(20, 20), (37, 20)], 10)] = 1
    labels[50:58, 2:8] = 2
    found = split_classes(labels, [1, 2], (1.0, 1.0))
    assert found.max() == 3 and set(np.unique(found[labels == 2])) == {3}


def test_instance_table_by_hand_2d():
    """Two squares on a 2D grid of 0.5 x 0.25 mm pixels, origin (10, 20) mm, axes flipped in x."""
    grid = Grid((10, 8, 1), (0.5, 0.25, 1.0), (10.0, 20.0, 0.0), (-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    instances = np.zeros(grid.shape, np.uint32)
    instances[1:3, 1:3] = 4  # 2 x 2 pixels, centre voxel (1.5, 1.5)
    instances[5:9, 2:5] = 7  # 4 x 3 pixels, centre voxel (6.5, 3)
    classes = np.where(instances > 0, 1, 0).astype(np.uint8)
    classes[5, 2] = 2  # one stray pixel of another class: the majority wins
    rows = instance_table(instances, classes, grid, {1: "nucleus"})
    assert [r["id"] for r in rows] == [4, 7]
    first, second = rows
    assert first["class"] == second["class"] == "nucleus"
    assert first["voxels"] == 4 and first["area_mm2"] == pytest.approx(4 * 0.125)
    assert second["area_mm2"] == pytest.approx(12 * 0.125)
    assert (first["x_mm"], first["y_mm"]) == pytest.approx((10 - 1.5 * 0.5, 20 + 1.5 * 0.25))
    assert (second["x_mm"], second["y_mm"]) == pytest.approx((10 - 6.5 * 0.5, 20 + 3 * 0.25))
    assert (second["i_first"], second["i_last"], second["j_first"], second["j_last"]) == (5, 8, 2, 4)
    assert "z_mm" not in first and "volume_ml" not in first and "k_first" not in first


def test_instance_table_3d_volume_and_csv():
    grid = Grid((6, 6, 4), (2.0, 2.0, 5.0), (0.0, 0.0, -100.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    instances = np.zeros(grid.shape, np.uint32)
    instances[1:4, 1:4, 1:3] = 1  # 18 voxels of 20 mm3
    rows = instance_table(instances, instances.astype(np.uint8) * 3, grid)
    assert rows[0]["class"] == "3" and rows[0]["volume_ml"] == pytest.approx(18 * 20 / 1000)
    assert rows[0]["z_mm"] == pytest.approx(-100 + 1.5 * 5) and (rows[0]["k_first"], rows[0]["k_last"]) == (1, 2)
    text = table_csv(rows).splitlines()
    assert text[0].startswith("id,class,voxels,volume_ml,x_mm,y_mm,z_mm,i_first") and text[1].startswith("1,3,18,0.36,")
    assert table_csv([]) == "id,class,voxels\n"
    with pytest.raises(ValueError, match="grid's shape"):
        instance_table(instances[:3], instances[:3], grid)


def test_write_instances_on_a_2d_grid(tmp_path):
    """What `medseg predict` writes for the cells task: a 2D instance map on the mask's grid and its table."""
    import SimpleITK as sitk

    from medseg.config import load_task

    task = load_task("cells")
    grid = Grid((60, 40, 1), (0.0005, 0.0005, 1.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    labels = np.zeros(grid.shape, np.uint8)
    labels[..., 0][_discs((60, 40), [(20, 20), (37, 20)], 10)] = 1  # two touching nuclei ...
    labels[..., 0][labels[..., 0] == 0] = 2  # ... in a sea of cytoplasm
    counts = write_instances(labels, grid, task, tmp_path, "c1")
    assert counts == {"nucleus": 2}
    image = sitk.ReadImage(str(tmp_path / "c1_instances.nii.gz"))
    assert image.GetDimension() == 2 and image.GetSize() == (60, 40)
    assert image.GetSpacing() == pytest.approx((0.0005, 0.0005))
    ids = sitk.GetArrayFromImage(image).T
    assert image.GetPixelID() == sitk.sitkUInt16 and set(np.unique(ids)) == {0, 1, 2}
    np.testing.assert_array_equal(ids > 0, labels[..., 0] == 1)
    lines = (tmp_path / "c1_instances.csv").read_text().splitlines()
    assert lines[0] == "id,class,voxels,area_mm2,x_mm,y_mm,i_first,i_last,j_first,j_last"
    assert len(lines) == 3 and all(",nucleus," in line for line in lines[1:])


def test_specks_are_dropped_from_the_instance_map():
    mask = _discs((60, 40), [(20, 20), (37, 20)], 10)
    mask[55:57, 35:37] = True  # 4 pixels: 1 % of a disc of radius 10 (the median inscribed radius)
    found = split_instances(mask, (1.0, 1.0))
    assert found.max() == 2 and found[55:57, 35:37].max() == 0
    kept = split_instances(mask, (1.0, 1.0), Splitting(min_size_fraction=0.0))
    assert kept.max() == 3


def test_many_specks_do_not_shrink_the_expected_size():
    """Forty one-pixel specks outnumber two nuclei; the size is judged by voxels, so the specks still go
    and the touching nuclei are still split (not cut into pieces by a radius of one pixel)."""
    mask = _discs((80, 60), [(20, 20), (37, 20)], 10)
    mask[50::3, 40::3] = True
    found = split_instances(mask, (1.0, 1.0))
    assert found.max() == 2 and not found[50:, 40:].any()


TINY_CELLS = """\
name: cells_tiny
dimensions: 2
modality: MR
channels: [fluorescence]
labels: {1: nucleus, 2: cell}
instances: [nucleus]
spacing: [0.0005, 0.0005]
patch_size: [64, 64]
intensity: {normalize: image}
sampling: {samples_per_volume: 2, queue_length: 4}
network: {name: unet, filters: [4, 8]}
optimizer: {name: adamw, lr: 0.01, weight_decay: 0.0}
schedule: {epochs: 1, steps_per_epoch: 2, batch_size: 2, validate_every: 1}
inference: {sw_batch_size: 2}
"""


def test_predict_and_evaluate_write_and_score_instances(tmp_path, capsys):
    """sample-data -> train (2 steps) -> predict -> evaluate on the cells phantom: the instance map lies on
    the image's 2D grid, its table has a row per id, and evaluate reports the instance scores."""
    import json

    import SimpleITK as sitk

    from medseg.cli import main

    task = tmp_path / "cells_tiny.yaml"
    task.write_text(TINY_CELLS)
    data, run, out = tmp_path / "data", tmp_path / "run", tmp_path / "pred"
    assert main(["sample-data", "--task", "cells", "--out", str(data), "--cases", "2", "--test-cases", "1"]) == 0
    assert main(["train", "--task", str(task), "--data", str(data), "--out", str(run), "--folds", "2"]) == 0
    assert main(["predict", str(data / "imagesTs"), "-m", str(run), "-o", str(out), "--backend", "torch"]) == 0
    image = sitk.ReadImage(str(data / "imagesTs" / "cells_002.nii.gz"))
    found = sitk.ReadImage(str(out / "cells_002_instances.nii.gz"))
    assert found.GetSize() == image.GetSize() and found.GetSpacing() == image.GetSpacing()
    assert found.GetOrigin() == image.GetOrigin() and found.GetDirection() == image.GetDirection()
    ids = sitk.GetArrayFromImage(found)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "cells_002_seg.nii.gz")))
    assert not (ids[seg != 1]).any()  # instances only where the mask says nucleus
    rows = (out / "cells_002_instances.csv").read_text().splitlines()[1:]
    assert len(rows) == len(np.unique(ids[ids > 0]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"][0]["instances"] == {"nucleus": len(rows)}
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(out), "--ref", str(data / "labelsTs"), "--task", str(task),
                 "-o", str(tmp_path / "ev")]) == 0
    assert "nucleus instances, mean of 1 case(s): F1@0.5" in capsys.readouterr().out
    assert "instance_f1" in (tmp_path / "ev" / "metrics.csv").read_text()
