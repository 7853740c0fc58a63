"""The cells phantom: deterministic, touching nuclei, labels that agree with the instances, files on disk."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli import main
from medseg.data.datasets import load_dataset
from medseg.data.phantom.cells import LABELS, make_field, sample_field, write_cells_dataset
from medseg.errors import InputError


def _touching_pairs(instances: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of different nuclei that share an edge between two pixels."""
    pairs = set()
    for a, b in ((instances[1:], instances[:-1]), (instances[:, 1:], instances[:, :-1])):
        meet = (a > 0) & (b > 0) & (a != b)
        pairs |= {tuple(sorted(p)) for p in zip(a[meet].tolist(), b[meet].tolist())}
    return pairs


def test_same_seed_same_field_other_seed_other_field():
    first, again, other = sample_field(3), sample_field(3), sample_field(3, seed=1)
    for name in ("image", "labels", "instances", "cells"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.image, other.image)
    assert first.image.dtype == np.uint16 and first.image.shape == (256, 256)
    assert first.spacing_mm == (0.0005, 0.0005)


def test_fields_hold_touching_nuclei_and_a_dozen_cells():
    for index in range(4):
        field = sample_field(index)
        assert 8 <= field.instances.max() <= 30
        assert _touching_pairs(field.instances), f"field {index} has no touching nuclei"


def test_labels_agree_with_instances_and_every_nucleus_lies_in_one_cell():
    field = sample_field(1)
    labels, nuclei, cells = field.labels, field.instances, field.cells
    assert set(np.unique(labels)) == {0, *LABELS}
    np.testing.assert_array_equal(labels == 1, nuclei > 0)
    np.testing.assert_array_equal(labels == 2, (cells > 0) & (nuclei == 0))  # cell = cytoplasm: cell minus nucleus
    for nucleus in range(1, int(nuclei.max()) + 1):
        owners = np.unique(cells[nuclei == nucleus])
        assert owners.tolist() == [nucleus]  # its own cell, whole
    assert sorted(np.unique(nuclei))[1:] == list(range(1, int(nuclei.max()) + 1))  # ids 1..n


def test_nuclei_brighter_than_cytoplasm_brighter_than_background():
    field = sample_field(2)
    image = field.image.astype(float)
    nucleus, cytoplasm, background = (np.median(image[field.labels == k]) for k in (1, 2, 0))
    assert nucleus > 1.5 * (cytoplasm - 100) + 100 and cytoplasm > background + 5


def test_a_field_takes_well_under_a_second():
    start = time.perf_counter()
    make_field(7)
    assert time.perf_counter() - start < 1.0


def test_bad_shape_is_refused():
    with pytest.raises(InputError, match="at least 16 x 16 pixels"):
        make_field(0, shape=(8, 256))


def test_dataset_on_disk_is_2d_nifti_with_instances(tmp_path):
    root = write_cells_dataset(tmp_path / "cells", n_train=2, n_test=1, seed=0)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "nucleus", "2": "cell"}
    assert [e["instances"] for e in meta["test"]] == ["./instancesTs/cells_002.nii.gz"]
    cases = load_dataset(root)
    assert [c.name for c in cases] == ["cells_000", "cells_001"]
    field = sample_field(2, seed=0)
    for folder, expected in (("imagesTs", field.image), ("labelsTs", field.labels), ("instancesTs", field.instances)):
        image = sitk.ReadImage(str(root / folder / "cells_002.nii.gz"))
        assert image.GetDimension() == 2 and image.GetSize() == (256, 256)
        assert image.GetSpacing() == pytest.approx((0.0005, 0.0005), rel=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image).T, expected)


def test_cli_sample_data_cells(tmp_path, capsys):
    assert main(["sample-data", "--task", "cells", "--out", str(tmp_path / "c"), "--cases", "1",
                 "--test-cases", "1"]) == 0
    assert "1 training and 1 test cases" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "dataset.json", "imagesTr", "imagesTs", "instancesTr", "instancesTs", "labelsTr", "labelsTs"]
    assert main(["sample-data", "--task", "liver", "--out", str(tmp_path / "x")]) == 2
    assert "available: prostate, cells" in capsys.readouterr().err
