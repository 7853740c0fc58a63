"""Inference backends: OpenVINO against torch on a tiny trained model, its conversion cache, the CLI flag,
and the error where OpenVINO is missing. The OpenVINO tests run where it is installed (CI installs the
extra); the missing-OpenVINO path runs everywhere, in a subprocess where the import really fails."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import blob_case, make_grid

from medseg.cli import main
from medseg.errors import InputError
from medseg.infer.backends import openvino_network, openvino_version, resolve_backend
from medseg.infer.predictor import Predictor, load_model
from medseg.io import write_image
from medseg.model.folder import load_checkpoint, read_run_config
from medseg.model.networks import build_network

needs_openvino = pytest.mark.skipif(openvino_version() is None, reason='needs pip install "medseg[openvino]"')


def tiny_network(folder: Path) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """The folder's network in fp32 (not prepared), and one window's (C, x, y, z)."""
    plan = read_run_config(folder).network
    network = build_network(plan)
    network.load_state_dict(load_checkpoint(folder / "best.pt")["model"])
    return network, (plan.in_channels, *plan.patch_size)


def scan_case(folder: Path) -> Path:
    grid = make_grid("PLI", shape=(44, 40, 20), spacing=(1.5, 1.4, 3.0))
    image, _ = blob_case(grid, seed=11)
    return write_image(image, grid, folder / "scan.nii.gz")


@pytest.fixture
def model_copy(tiny_model, tmp_path) -> Path:
    """A copy of the tiny model folder, so that its cache starts empty and can be broken."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model", ignore=shutil.ignore_patterns(".*", "openvino")))


@pytest.mark.parametrize("backend, device, expected", [
    pytest.param("torch", "cpu", "torch", id="torch"),
    pytest.param("auto", "cuda", "torch", id="auto-on-a-gpu-is-torch"),
])
def test_resolve_backend(backend, device, expected):
    assert resolve_backend(backend, torch.device(device)) == expected


def test_auto_on_the_cpu_takes_openvino_where_installed():
    expected = "torch" if openvino_version() is None else "openvino"
    assert resolve_backend("auto", torch.device("cpu")) == expected


@pytest.mark.parametrize("backend, device, message", [
    pytest.param("onnx", "cpu", "backend 'onnx' is not one of auto, torch, openvino", id="unknown"),
    pytest.param("openvino", "cuda", "--backend openvino runs on the CPU, not on cuda", id="openvino-on-a-gpu"),
])
def test_bad_backend(backend, device, message):
    with pytest.raises(InputError, match=message):
        resolve_backend(backend, torch.device(device))


@needs_openvino
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("bf16", 0.05)])
def test_openvino_logits_match_torch(tiny_model, tmp_path, precision, tolerance):
    """Same network, same windows: fp32 to float rounding (relative to the logits' range), bf16 roughly;
    any batch size (the converted network's batch is free), main output only (deep supervision is on)."""
    network, window = tiny_network(tiny_model)
    network.train()  # conversion must take the eval-mode network, whatever mode it is handed in
    compiled = openvino_network(network, tiny_model / "best.pt", window, precision, cache_roots=[tmp_path])
    assert network.training  # and leaves the caller's network as it was
    batch = torch.randn(3, *window, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = network.eval()(batch)
    got = compiled(batch)
    assert got.shape == expected.shape == (3, 6, *window[1:])
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= tolerance * scale


@needs_openvino
def test_openvino_labels_equal_torch_fp32(tiny_model, tmp_path):
    scan = scan_case(tmp_path)
    torch_seg = Predictor(tiny_model, device="cpu", precision="fp32", backend="torch").predict(scan)
    openvino = Predictor(tiny_model, device="cpu", precision="fp32", backend="openvino")
    assert openvino.bundle.backend == "openvino"
    seg = openvino.predict(scan)
    assert seg.grid == torch_seg.grid
    assert (seg.labels > 0).sum() > 100  # the tiny model finds organs: the comparison means something
    # equal on the machines tried; on another CPU's kernels a voxel at a near-tie (fp32 rounding) could flip
    assert (seg.labels != torch_seg.labels).sum() <= 3


@needs_openvino
def test_cache_is_made_once_reused_and_renewed_with_the_checkpoint(model_copy):
    first = load_model(model_copy, "cpu", precision="fp32", backend="openvino").network
    assert first.converted
    entry = first.cache
    assert entry.parent == model_copy / "openvino"
    assert sorted(p.name for p in entry.iterdir()) == ["key.json", "network.bin", "network.xml"]
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    written = (entry / "network.bin").stat().st_mtime_ns

    again = load_model(model_copy, "cpu", precision="bf16", backend="openvino").network
    assert not again.converted  # read, not converted: one entry serves both precisions
    assert again.cache == entry and (entry / "network.bin").stat().st_mtime_ns == written

    state = load_checkpoint(model_copy / "best.pt")
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, model_copy / "best.pt")
    renewed = load_model(model_copy, "cpu", precision="fp32", backend="openvino").network
    assert renewed.converted and renewed.cache != entry
    assert [p.name for p in (model_copy / "openvino").iterdir()] == [renewed.cache.name]  # the stale one is gone
    batch = torch.randn(2, 1, 16, 16, 16)
    assert not torch.allclose(first(batch), renewed(batch))


@needs_openvino
def test_auto_times_both_backends_once_and_keeps_the_verdict(model_copy):
    import json

    first = load_model(model_copy, "cpu", precision="fp32", backend="auto")
    record = next((model_copy / "openvino").glob("*/speed.json"))
    [(signature, verdict)] = json.loads(record.read_text()).items()
    batch = read_run_config(model_copy).task.inference.sw_batch_size  # the task's windows per forward
    assert f"{torch.get_num_threads()} threads; fp32; batch [{batch}, 1, 16, 16, 16]" in signature
    seconds = verdict["seconds"]
    assert 0 < seconds["torch"] < 60 and 0 < seconds["openvino"] < 60
    other = {"torch": "openvino", "openvino": "torch"}[verdict["faster"]]
    assert verdict["faster"] == first.backend and seconds[verdict["faster"]] <= seconds[other]  # kept rounded: ties

    # the next load takes the kept verdict, whichever it says, without timing again
    for kept in ("torch", "openvino"):
        record.write_text(json.dumps({signature: {"faster": kept, "seconds": seconds}}))
        assert load_model(model_copy, "cpu", precision="fp32", backend="auto").backend == kept
    # another precision is another verdict; an explicit backend is never timed
    assert load_model(model_copy, "cpu", precision="bf16", backend="auto").backend in ("torch", "openvino")
    assert len(json.loads(record.read_text())) == 2
    record.write_text("{cut short")
    assert load_model(model_copy, "cpu", precision="fp32", backend="openvino").backend == "openvino"
    assert record.read_text() == "{cut short"
    assert load_model(model_copy, "cpu", precision="fp32", backend="auto").backend in ("torch", "openvino")
    assert signature in json.loads(record.read_text())  # timed again, written whole


@needs_openvino
def test_unwritable_model_folder_caches_in_the_user_cache(model_copy, tmp_path, monkeypatch):
    (model_copy / "openvino").write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    bundle = load_model(model_copy, "cpu", precision="fp32", backend="openvino")
    assert bundle.network.cache.parent == tmp_path / "xdg" / "medseg" / "openvino"
    assert "cache " + str(bundle.network.cache) in bundle.network.describe()
    assert not load_model(model_copy, "cpu", precision="fp32", backend="openvino").network.converted

    monkeypatch.setenv("XDG_CACHE_HOME", str(model_copy / "openvino"))  # a file too: nowhere to cache
    uncached = load_model(model_copy, "cpu", precision="fp32", backend="openvino").network
    assert uncached.cache is None and uncached.converted
    assert "not cached" in uncached.describe()


@needs_openvino
def test_cli_backend_openvino_writes_the_mask_on_the_scan_grid(tiny_model, tmp_path, capsys):
    scan = scan_case(tmp_path)
    code = main(["predict", str(scan), "-o", str(tmp_path / "out"), "-m", str(tiny_model), "--device", "cpu",
                 "--backend", "openvino", "--no-overlays"])
    assert code == 0, capsys.readouterr().err
    assert f"{tiny_model.name}: openvino " in capsys.readouterr().err
    mask, source = sitk.ReadImage(str(tmp_path / "out" / "scan_seg.nii.gz")), sitk.ReadImage(str(scan))
    assert mask.GetSize() == source.GetSize()
    np.testing.assert_allclose(mask.GetSpacing(), source.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(mask.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(mask.GetDirection(), source.GetDirection(), atol=1e-6)
    assert sitk.GetArrayFromImage(mask).max() > 0


MISSING_OPENVINO = """
import sys
sys.modules["openvino"] = None  # `import openvino` now fails as if it were not installed
import torch
from medseg.cli import main
from medseg.infer.backends import resolve_backend
print(resolve_backend("auto", torch.device("cpu")))
sys.exit(main(sys.argv[1:]))
"""


def test_backend_openvino_without_openvino_is_a_one_line_error(tiny_model, tmp_path):
    scan, out = scan_case(tmp_path), tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", MISSING_OPENVINO, "predict", str(scan), "-o", str(out),
                           "-m", str(tiny_model), "--device", "cpu", "--backend", "openvino"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.stdout == "torch\n"  # auto falls back to torch
    assert done.returncode == 2, done.stderr
    assert done.stderr == 'error: --backend openvino: OpenVINO is not installed (pip install "medseg[openvino]")\n'
    assert not out.exists()  # refused before anything was written
