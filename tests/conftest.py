"""Shared fixtures: tiny seeded volumes written as real files to tmp_path. Nothing is downloaded."""

from __future__ import annotations

import json
import locale
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.spatial.transform import Rotation

from medseg.config import load_task
from medseg.data.preprocess import ChannelIntensity, Preprocessing
from medseg.infer.predictor import ModelBundle, Predictor
from medseg.io import Grid, write_image, write_label_map
from medseg.model.networks import NetworkPlan

# Direction matrices (ITK convention: columns are the world directions of the voxel axes).
DIRECTIONS = {
    "LPS": np.eye(3),
    "RAS": np.diag([-1.0, -1.0, 1.0]),
    "PLI": np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]),
    "oblique": Rotation.from_euler("xyz", [12, -7, 25], degrees=True).as_matrix(),
}


def make_grid(orientation: str = "LPS", shape=(40, 36, 24), spacing=(1.2, 1.1, 2.5), origin=(-20.0, 15.5, 7.25)) -> Grid:
    return Grid(tuple(shape), tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
                tuple(DIRECTIONS[orientation].ravel().tolist()))


def blob_case(grid: Grid, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like (X, Y, Z) int16 image with five ellipsoid organs labelled 1..5, placed in world space.

    Organs 4 and 5 sit on the patient's left (+x in LPS) and right (-x), whatever the voxel order.
    """
    rng = np.random.default_rng(seed)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1).reshape(-1, 3)
    world = index @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    centre = world.mean(0)
    extent = np.ptp(world, 0)
    image = np.full(len(world), -50.0) + rng.normal(0, 10, len(world))
    labels = np.zeros(len(world), np.uint8)
    organs = [  # (offset as a fraction of the extent, radius fraction, HU)
        ((0.0, 0.0, -0.15), 0.12, 40.0),
        ((0.0, -0.05, 0.2), 0.16, 10.0),
        ((0.0, 0.22, -0.1), 0.09, -20.0),
        ((0.3, 0.0, 0.0), 0.11, 700.0),
        ((-0.3, 0.0, 0.0), 0.11, 700.0),
    ]
    for label, (offset, radius, hu) in enumerate(organs, start=1):
        c = centre + np.asarray(offset) * extent
        inside = (((world - c) / (radius * extent.min() * np.array([1, 1, 1.5]))) ** 2).sum(1) <= 1
        image[inside] = hu + rng.normal(0, 10, inside.sum())
        labels[inside] = label
    return image.reshape(grid.shape).astype(np.int16), labels.reshape(grid.shape)

def partial_blob_dataset(root: Path, orientations: list[str], first_seed: int) -> Path:
    """An MSD-style dataset of blob cases `hn_<i>`; hn_1 did not contour the rectum (and has none drawn),
    as a partially labelled head-and-neck set lists `contoured` organs."""
    entries = []
    for i, orientation in enumerate(orientations):
        grid = make_grid(orientation, shape=(44, 40, 20), spacing=(1.5, 1.5, 3.0))
        image, labels = blob_case(grid, seed=first_seed + i)
        entry = {"image": f"./imagesTr/hn_{i}.nii.gz", "label": f"./labelsTr/hn_{i}.nii.gz"}
        if i == 1:
            labels[labels == 3] = 0
            entry["contoured"] = ["prostate", "bladder", "femoral_head_left", "femoral_head_right"]
        write_image(image, grid, root / "imagesTr" / f"hn_{i}.nii.gz")
        write_label_map(labels, grid, root / "labelsTr" / f"hn_{i}.nii.gz")
        entries.append(entry)
    (root / "dataset.json").write_text(json.dumps({"name": "hn", "labels": {"0": "background"}, "training": entries}))
    return root



@pytest.fixture
def write_case(tmp_path: Path):
    """Write a blob case on a grid of the given orientation; returns (image_path, label_path, grid)."""

    def _write(name: str = "case_000", orientation: str = "LPS", suffix: str = ".nii.gz", seed: int = 0, **grid_kw):
        grid = make_grid(orientation, **grid_kw)
        image, labels = blob_case(grid, seed)
        image_path = write_image(image, grid, tmp_path / f"{name}{suffix}")
        label_path = write_label_map(labels, grid, tmp_path / f"{name}_label{suffix}")
        return image_path, label_path, grid

    return _write


TINY_TASK = """\
name: tiny
labels: {1: prostate, 2: bladder, 3: rectum, 4: femoral_head_left, 5: femoral_head_right}
pairs: [[femoral_head_left, femoral_head_right]]
spacing: [3.0, 3.0, 3.0]
patch_size: [16, 16, 16]
intensity: {window: [-200, 800]}
sampling: {samples_per_volume: 2, queue_length: 8}
augmentation:
  flip: {p: 0.5}
  noise: {p: 0.2}
network: {name: dynunet, filters: [4, 8, 16], deep_supervision: true}
optimizer: {name: adamw, lr: 0.01, weight_decay: 0.0}
schedule: {epochs: 4, steps_per_epoch: 5, batch_size: 2, validate_every: 2}
inference: {sw_batch_size: 2, largest_component: [bladder]}
"""


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> tuple[Path, Path]:
    """An MSD-layout dataset of six blob cases in four orientations, and a tiny task file for it."""
    import json

    root = tmp_path_factory.mktemp("tiny") / "dataset"
    entries = []
    for i, orientation in enumerate(["LPS", "RAS", "PLI", "oblique", "LPS", "RAS"]):
        grid = make_grid(orientation, shape=(48, 40, 20), spacing=(1.5, 1.5, 3.0))
        image, labels = blob_case(grid, seed=i)
        write_image(image, grid, root / "imagesTr" / f"blob_{i}.nii.gz")
        write_label_map(labels, grid, root / "labelsTr" / f"blob_{i}.nii.gz")
        entries.append({"image": f"./imagesTr/blob_{i}.nii.gz", "label": f"./labelsTr/blob_{i}.nii.gz"})
    organs = {"0": "background", "1": "prostate", "2": "bladder", "3": "rectum", "4": "femoral_head_left",
              "5": "femoral_head_right"}
    (root / "dataset.json").write_text(json.dumps({"name": "tiny", "modality": {"0": "CT"}, "labels": organs,
                                                   "training": entries, "test": []}))
    task = root.parent / "tiny.yaml"
    task.write_text(TINY_TASK)
    return root, task


@pytest.fixture(scope="session")
def tiny_model(tiny_dataset, tmp_path_factory) -> Path:
    """A run folder trained for a few steps on the tiny dataset (shared by the predict tests)."""
    from medseg.train import TrainOptions, fit

    root, task = tiny_dataset
    return fit(TrainOptions(task=task, data=root, out=tmp_path_factory.mktemp("runs") / "tiny", epochs=2))


# ---------------------------------------------------------------------- an MSD dataset of blobs


def make_msd(root: Path, write_case, orientations=("LPS", "PLI", "PLI"), test=0) -> Path:
    """An MSD dataset of blob cases: imagesTr/, labelsTr/ and dataset.json (test cases as plain paths)."""
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / folder).mkdir(parents=True)
    entries = {"training": [], "test": []}
    for i, orientation in enumerate([*orientations, *["RAS"] * test]):
        split, suffix = ("training", "Tr") if i < len(orientations) else ("test", "Ts")
        image, label, _ = write_case(f"case_{i:03d}", orientation=orientation, seed=i)
        image.rename(root / f"images{suffix}" / f"case_{i:03d}.nii.gz")
        label.rename(root / f"labels{suffix}" / f"case_{i:03d}.nii.gz")
        image_entry = f"./images{suffix}/case_{i:03d}.nii.gz"
        entries[split].append({"image": image_entry, "label": f"./labels{suffix}/case_{i:03d}.nii.gz"}
                              if split == "training" else image_entry)
    (root / "dataset.json").write_text(json.dumps({"name": "Pelvis", "labels": {"0": "background"}, **entries}))
    return root


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.fixture
def msd(tmp_path, write_case) -> Path:
    return make_msd(tmp_path / "Task01_Pelvis", write_case)


class Oracle(torch.nn.Module):
    """Reads the label id straight off the voxel value: logits peak at round(x)."""

    def __init__(self, classes: int = 6):
        super().__init__()
        self.register_buffer("ids", torch.arange(classes, dtype=torch.float32).view(1, classes, 1, 1, 1))

    def forward(self, x):
        return -10.0 * (x[:, :1] - self.ids) ** 2


class SideAware(torch.nn.Module):
    """Calls a bright voxel 'left' (4) in the low-index half of RAS axis 0 and 'right' (5) otherwise,
    as a trained network would: by where it sits, not by what it was called."""

    def forward(self, x):
        bright = x[:, :1] > 0.5
        low = torch.zeros_like(bright)
        low[:, :, : x.shape[2] // 2] = True
        logits = torch.zeros(x.shape[0], 6, *x.shape[2:])
        logits[:, 0] = (~bright)[:, 0].float()
        logits[:, 4] = (bright & low)[:, 0].float()
        logits[:, 5] = (bright & ~low)[:, 0].float()
        return logits


def oracle_predictor(spacing, network=None, tta=False, patch=(16, 16, 16)) -> Predictor:
    task = load_task("prostate")
    prep = Preprocessing(tuple(spacing), "none", (ChannelIntensity(None, 0.0, 1.0),))
    plan = NetworkPlan("unet", 1, 6, (4, 8), ((3, 3, 3),) * 2, ((1, 1, 1), (2, 2, 2)), False, 0.0, patch)
    bundle = ModelBundle(None, task, prep, plan, (network or Oracle()).eval(), torch.device("cpu"))
    return Predictor(bundle, tta=tta)


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """refs/case_{0,1,2}.nii.gz and preds/case_{0,1}_seg.nii.gz + stray_seg.nii.gz: each prediction
    is its reference shifted by one voxel along x, with the rectum (3) missing in case_1."""
    grid = make_grid("LPS", shape=(40, 36, 24))
    refs, preds = tmp_path / "refs", tmp_path / "preds"
    for seed in range(3):
        _, labels = blob_case(grid, seed)
        write_label_map(labels, grid, refs / f"case_{seed}.nii.gz")
        if seed < 2:
            pred = np.roll(labels, 1, axis=0)
            if seed == 1:
                pred[pred == 3] = 0
            write_label_map(pred, grid, preds / f"case_{seed}_seg.nii.gz")
    write_label_map(labels, grid, preds / "stray_seg.nii.gz")
    return preds, refs


def write_dicom_series(volume: np.ndarray, grid: Grid, folder: Path, seed: int = 0) -> np.ndarray:
    """One CT slice per file, named in a shuffled order unrelated to slice position; returns the names."""
    folder.mkdir()
    image = grid.apply_to(sitk.GetImageFromArray(volume.transpose(2, 1, 0)))
    d = grid.direction
    saved = locale.setlocale(locale.LC_ALL)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    names = np.random.default_rng(seed).permutation(volume.shape[2])
    for k in range(volume.shape[2]):
        slice_ = image[:, :, k]
        for tag, value in [
            ("0008|0060", "CT"),
            ("0020|000e", "1.2.826.0.1.3680043.2.1125.1.4242"),  # SeriesInstanceUID
            ("0020|000d", "1.2.826.0.1.3680043.2.1125.1.4241"),  # StudyInstanceUID
            ("0008|0018", f"1.2.826.0.1.3680043.2.1125.1.4242.{k + 1}"),  # SOPInstanceUID
            ("0020|0037", "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))),
            ("0020|0032", "\\".join(f"{v:.10f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))),
            ("0028|0030", f"{grid.spacing[1]}\\{grid.spacing[0]}"),  # rows\columns
            ("0018|0050", str(grid.spacing[2])),
            ("0020|0013", str(k + 1)),
        ]:
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{names[k]:04d}.dcm"))
        writer.Execute(slice_)
    locale.setlocale(locale.LC_ALL, saved)  # GDCM's writer leaves the C locale set (ASCII text files after it)
    return names


@pytest.fixture
def ct_series():
    """Factory: `ct_series(folder, image, **patient)` writes a SimpleITK image as a CT series with pydicom
    (`medseg.dicom.ct`, any grid, head or feet first) and returns its files, shuffled, so that nothing
    under test can rely on list order matching slice order. `patient`: fields of `medseg.dicom.ct.Patient`."""
    from medseg.dicom.ct import Patient, write_ct_series

    def _write(folder: Path, image: sitk.Image, **patient) -> list[Path]:
        paths = write_ct_series(image, folder, Patient(**patient))
        return [paths[i] for i in np.random.default_rng(0).permutation(len(paths))]

    return _write


class BrightIsBladder(torch.nn.Module):
    """Bladder (2) wherever the voxel is brighter than soft tissue, by its own value alone."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 6, *x.shape[2:])
        logits[:, 2] = x[:, 0] - 20.0
        return logits


NUCLEI_TASK = """\
name: nuclei
dimensions: 2
modality: MR
channels: [grey]
labels: {1: nucleus}
spacing: [0.0005, 0.0005]
patch_size: [32, 32]
intensity: {normalize: image}
network: {name: unet, filters: [4, 8]}
"""


def disc(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    """A boolean (X, Y) disc."""
    x, y = np.mgrid[:shape[0], :shape[1]]
    return (x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= radius ** 2


@pytest.fixture
def nuclei(tmp_path) -> tuple[Path, Path]:
    """Microscopy at 0.5 um pixels (0.0005 mm): an MSD dataset of three 64 x 64 2D NIfTI fields, one nucleus
    each (discs of radius 8, 9 and 10 pixels: 49 to 79 um2, 5e-5 to 8e-5 mm2), and its 2D task file."""
    root = tmp_path / "nuclei"
    entries = []
    for i, radius in enumerate((8, 9, 10)):
        labels = disc((64, 64), (30, 34), radius).astype(np.uint8)
        for folder, array in (("imagesTr", 40.0 + 150.0 * labels), ("labelsTr", labels)):
            image = sitk.GetImageFromArray(array.T)  # (X, Y) -> SimpleITK's (Y, X) array order
            image.SetSpacing((0.0005, 0.0005))
            (root / folder).mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(image, str(root / folder / f"n{i}.nii.gz"))
        entries.append({"image": f"./imagesTr/n{i}.nii.gz", "label": f"./labelsTr/n{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": "nuclei", "labels": {"0": "background", "1": "nucleus"},
                                                   "training": entries}))
    task = tmp_path / "nuclei.yaml"
    task.write_text(NUCLEI_TASK)
    return root, task
