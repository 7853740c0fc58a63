"""medseg.config: tasks load by name or path, round trip through JSON, and bad files fail naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medseg.config import (
    Task,
    available_tasks,
    load_task,
    parse_task,
    read_labels_file,
    task_to_dict,
)
from medseg.errors import ConfigError, InputError

MINIMAL = "name: pelvis\nlabels:\n  1: prostate\n  2: {name: bladder, color: [1, 2, 3]}\n"


def write_task(tmp_path: Path, text: str, name: str = "task.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_prostate_loads_by_name():
    task = load_task("prostate")
    assert "prostate" in available_tasks()
    assert task.name == "prostate" and task.modality == "CT" and task.channels == ("CT",)
    assert task.label_names == {1: "prostate", 2: "bladder", 3: "rectum", 4: "femoral_head_left",
                                5: "femoral_head_right"}
    assert task.mirrored_order() == (0, 1, 2, 3, 5, 4)
    assert task.num_classes == 6


def test_headneck_loads_and_its_patch_fits_its_network():
    from medseg.model.networks import plan_network

    task = load_task("headneck")
    assert task.label_names == {1: "brainstem", 2: "spinal_cord", 3: "right_parotid", 4: "left_parotid",
                                5: "esophagus", 6: "larynx", 7: "mandible"}
    assert task.mirrored_order()[3:5] == (4, 3)
    plan = plan_network(task.network, 1, task.num_classes, task.patch_size, task.spacing)
    assert all(p % d == 0 for p, d in zip(task.patch_size, plan.divisor))


def test_bundled_tasks_carry_tg263_names():
    """RTSTRUCT and DICOM-SEG outputs name organs as planning systems expect (AAPM TG-263)."""
    names = {label.name: label.tg263 for name in ("headneck", "prostate") for label in load_task(name).labels}
    assert names == {"brainstem": "Brainstem", "spinal_cord": "SpinalCord", "right_parotid": "Parotid_R",
                     "left_parotid": "Parotid_L", "esophagus": "Esophagus", "larynx": "Larynx",
                     "mandible": "Bone_Mandible", "prostate": "Prostate", "bladder": "Bladder", "rectum": "Rectum",
                     "femoral_head_left": "Femur_Head_L", "femoral_head_right": "Femur_Head_R"}


def test_headneck_surface_tolerances_are_the_published_ones():
    """Nikolov et al. 2021 inter-observer tolerances; organs that study did not measure have none (2 mm fallback)."""
    tolerances = {label.name: label.tolerance_mm for label in load_task("headneck").labels}
    assert tolerances == {"brainstem": 2.5, "spinal_cord": 2.93, "right_parotid": 2.85, "left_parotid": 2.85,
                          "esophagus": None, "larynx": None, "mandible": 1.01}
    assert all(label.tolerance_mm is None for label in load_task("prostate").labels)


def test_user_task_loads_by_path(tmp_path):
    task = load_task(write_task(tmp_path, MINIMAL + "spacing: [1, 1, 2.5]\naugmentation:\n  flip: {axes: [LR, SI]}\n"))
    assert task.name == "pelvis"
    assert [(lab.id, lab.name) for lab in task.labels] == [(1, "prostate"), (2, "bladder")]
    assert task.labels[1].color == (1, 2, 3)
    assert task.spacing == (1.0, 1.0, 2.5)
    assert task.augmentation.flip.axes == ("LR", "SI") and task.augmentation.flip.p == 0.5
    assert task.augmentation.affine is None  # absent augmentations are off


def test_json_task_file(tmp_path):
    path = write_task(tmp_path, json.dumps(yaml.safe_load(MINIMAL)), "task.json")
    assert load_task(path).label_names == {1: "prostate", 2: "bladder"}


@pytest.mark.parametrize("source", ["prostate", "minimal"])
def test_round_trip_through_json(tmp_path, source):
    task = load_task("prostate") if source == "prostate" else load_task(write_task(tmp_path, MINIMAL))
    again = parse_task(json.loads(json.dumps(task_to_dict(task))), "model/config.json")
    assert isinstance(again, Task) and again == task


@pytest.mark.parametrize("text, message", [
    pytest.param(MINIMAL + "modalty: CT\n", r"unknown key 'modalty' \(expected one of: name, labels", id="top-level-key"),
    pytest.param(MINIMAL + "augmentation:\n  flip: {axs: [LR]}\n", r"unknown key 'augmentation\.flip\.axs'",
                 id="nested-key"),
    pytest.param(MINIMAL + "schedule: {epochs: ten}\n", r"key 'schedule\.epochs' must be an integer, got 'ten'",
                 id="wrong-type"),
    pytest.param(MINIMAL + "patch_size: [96, 96]\n", r"key 'patch_size' must be a list of 3 values", id="wrong-length"),
    pytest.param(MINIMAL + "network: {name: resnet}\n", r"key 'network\.name' must be one of 'dynunet', 'unet'",
                 id="bad-literal"),
    pytest.param(MINIMAL + "pairs: [[prostate, femur]]\n", r"key 'pairs\[0\]' names 'femur', which is not an organ",
                 id="pair-missing-organ"),
    pytest.param("name: x\nlabels: {0: background}\n", r"key 'labels\.0' must be a label id in 1\.\.255", id="label-zero"),
    pytest.param("labels: {1: prostate}\n", r"missing key 'name'", id="missing-name"),
    pytest.param(MINIMAL + "ignore_label: 1\n", r"key 'ignore_label' must be a label value in 1\.\.255 that no organ uses, "
                 r"got 1", id="ignore-label-is-an-organ"),
    pytest.param(MINIMAL + "spacing: [1, -1, 2]\n", r"key 'spacing' must be positive", id="negative-spacing"),
    pytest.param(MINIMAL + "labels_extra: [\n", r"not valid YAML", id="malformed-yaml"),
    pytest.param("- just\n- a list\n", r"a task file must be a mapping", id="not-a-mapping"),
    pytest.param("name: x\nlabels: {1: {name: p, tg263: Parotid_Superficial_L}}\n",
                 r"key 'labels\.1\.tg263' must be a TG-263 structure name: 1-16 characters", id="tg263-too-long"),
    pytest.param("name: x\nlabels: {1: {name: p, tg263: Parotid-L}}\n", r"of A-Z a-z 0-9 _ \^ and space, got 'Parotid-L'",
                 id="tg263-bad-character"),
    pytest.param("name: x\nlabels: {1: {name: p, tolerance_mm: 0}}\n",
                 r"key 'labels\.1\.tolerance_mm' must be a positive number of mm", id="tolerance-zero"),
    pytest.param("name: x\nlabels: {1: {name: p, tolerance_mm: two}}\n",
                 r"key 'labels\[0\]\.tolerance_mm' must be a number, got 'two'", id="tolerance-text"),
])
def test_bad_task_files_name_file_and_key(tmp_path, text, message):
    path = write_task(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as error:
        load_task(path)
    assert str(error.value).startswith(str(path))
    assert "\n" not in str(error.value)


def test_malformed_json_task(tmp_path):
    path = write_task(tmp_path, '{"name": "x", "labels": {"1": "a"},}', "task.json")
    with pytest.raises(ConfigError, match=r"task\.json: not valid JSON"):
        load_task(path)


def test_unknown_task_name_lists_available():
    with pytest.raises(ConfigError, match=r"unknown task 'prostrate' \(available: .*prostate"):
        load_task("prostrate")


def test_missing_task_file(tmp_path):
    with pytest.raises(ConfigError, match=r"task file not found: .*nope\.yaml"):
        load_task(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, message", [
    pytest.param('{"1": 2}', "must map", id="number-to-number"),
    pytest.param('{"1": "a", "2": "a"}', "repeated", id="repeated-name"),
    pytest.param('{"0": "background"}', "names no organ", id="background-only"),
    pytest.param('[1, 2]', "expected a mapping", id="list"),
])
def test_bad_labels_files(tmp_path, text, message):
    path = tmp_path / "labels.json"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        read_labels_file(path)


# ------------------------------------------------------------------------------------- 2D tasks

TASK_2D = "name: cells\ndimensions: 2\nlabels: {1: nucleus, 2: membrane}\n"


def test_2d_task_writes_two_values_and_stores_three(tmp_path):
    task = load_task(write_task(tmp_path, TASK_2D + "patch_size: [64, 48]\nspacing: [0.5, 0.25]\n"))
    assert task.dimensions == 2
    assert task.patch_size == (64, 48, 1)
    assert task.spacing == (0.5, 0.25, 1.0)
    assert parse_task(json.loads(json.dumps(task_to_dict(task))), "copy") == task  # model folders read it back


def test_3d_is_the_default_and_instances_name_labels(tmp_path):
    assert load_task("prostate").dimensions == 3
    assert load_task(write_task(tmp_path, TASK_2D, "bare.yaml")).patch_size == (256, 256, 1)
    task = load_task(write_task(tmp_path, TASK_2D + "patch_size: [32, 32]\ninstances: [nucleus]\n"))
    assert task.instances == ("nucleus",)


@pytest.mark.parametrize("text, message", [
    pytest.param(TASK_2D + "patch_size: [32, 32, 8]\n", r"key 'patch_size' of a 2D task must be \[X, Y\]",
                 id="2d-patch-with-depth"),
    pytest.param(TASK_2D + "patch_size: [32, 8]\n", r"key 'patch_size' must be at least 16 voxels per axis",
                 id="2d-patch-too-small"),
    pytest.param(TASK_2D + "augmentation: {flip: {axes: [LR, SI]}}\n",
                 r"key 'augmentation\.flip\.axes' must list LR or AP, got 'SI'", id="2d-flip-along-the-slice"),
    pytest.param(MINIMAL + "patch_size: [96, 96]\n", r"key 'patch_size' must be a list of 3 values",
                 id="3d-two-values"),
    pytest.param(MINIMAL + "dimensions: 4\n", r"key 'dimensions' must be one of 2, 3", id="dimensions-4"),
    pytest.param(TASK_2D + "instances: [cell]\n", r"key 'instances' names 'cell', which is not a label",
                 id="instances-unknown"),
])
def test_bad_2d_keys_name_file_and_key(tmp_path, text, message):
    path = write_task(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as error:
        load_task(path)
    assert str(error.value).startswith(str(path))
