"""int8 through NNCF: `medseg quantize` on a tiny trained model (one quantisation shared by the module), the
record it writes, and the rules predict reads it by (`medseg.infer.int8`: `--precision int8`, its refusals,
`auto` without bf16 units), which share the quantised model. Real OpenVINO and NNCF where installed (CI installs
both: the test extra); the missing-NNCF error runs everywhere, in a subprocess where the import really fails."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import edit_json

from medseg.cli import main
from medseg.errors import InputError
from medseg.infer.backends import openvino_version
from medseg.infer.predictor import Predictor, load_model
from medseg.infer.int8 import auto_takes_int8, int8_network, nncf_version, quantize_hint, record_path
from medseg.infer.quantize import MAX_DICE_CHANGE, MIN_AGREEMENT, calibration_windows, evenly, quantize_model, verdict
from medseg.infer.stitching import window_starts
from medseg.model.folder import load_checkpoint, read_run_config

needs_nncf = pytest.mark.skipif(openvino_version() is None or nncf_version() is None,
                                reason='needs pip install "medseg[int8]"')


def copy_model(source: Path, target: Path, cache: bool = True) -> Path:
    """A copy of a model folder; with `cache`, its OpenVINO cache (and int8 network) too."""
    skip = shutil.ignore_patterns(".*") if cache else shutil.ignore_patterns(".*", "openvino")
    return Path(shutil.copytree(source, target, ignore=skip))


@pytest.fixture(scope="module")
def quantized(tiny_model, tmp_path_factory) -> tuple[Path, dict]:
    """The tiny model quantised once (calibrated on its training cases, checked on its validation cases)."""
    folder = copy_model(tiny_model, tmp_path_factory.mktemp("int8") / "model", cache=False)
    return folder, quantize_model(folder, echo=lambda line: None)


@pytest.fixture
def passed_copy(quantized, tmp_path) -> Path:
    """A copy of the quantised model whose record says passed (the tiny model's own verdict depends on the CPU)."""
    folder = copy_model(quantized[0], tmp_path / "model")
    edit_json(record_path(folder), passed=True, refused_because=None)
    return folder


def validation_scan(folder: Path) -> Path:
    config = read_run_config(folder)
    return Path(config.data) / "imagesTr" / f"{config.split['validation'][0]}.nii.gz"


def op_types(xml: Path) -> dict[str, str]:
    import openvino as ov

    return {op.get_friendly_name(): op.get_type_name() for op in ov.Core().read_model(xml).get_ops()}


# ------------------------------------------------------------------------------------ the verdict


def case(agreement: float, fp32: dict, int8: dict) -> dict:
    return {"agreement": agreement, "dice_fp32": fp32, "dice_int8": int8}


@pytest.mark.parametrize("rows, passed, reason", [
    pytest.param({"a": case(0.9995, {"liver": 0.90, "cord": 0.70}, {"liver": 0.896, "cord": 0.7049})}, True, None,
                 id="within"),
    pytest.param({"a": case(1.0, {"cord": 0.70}, {"cord": 0.694}), "b": case(0.9999, {"cord": 0.70}, {"cord": 0.694})},
                 False, r"cord mean Dice 0.7000 -> 0.6940 over 2 case\(s\): \|dDice\| 0.0060 > 0.005",
                 id="an-organs-mean"),
    pytest.param({"a": case(1.0, {"cord": 0.70}, {"cord": 0.70}), "b": case(0.9999, {"cord": 0.70}, {"cord": 0.694})},
                 True, None, id="one-case-alone-is-recorded-not-gated"),
    pytest.param({"a": case(1.0, {"cord": 0.70}, {"cord": 0.73}), "b": case(0.9999, {"cord": 0.70}, {"cord": 0.69})},
                 False, r"cord mean Dice 0.7000 -> 0.7100", id="gains-count-as-changes-too"),
    pytest.param({"a": case(0.9989, {"cord": 0.7}, {"cord": 0.7})}, False, r"agreement 0.99890 < 0.999 \(a\)",
                 id="agreement"),
    pytest.param({"a": case(1.0, {"cord": None}, {"cord": 0.0})}, True, None, id="no-dice-is-left-out"),
    pytest.param({}, False, "no validation case was checked", id="no-cases"),
])
def test_verdict(rows, passed, reason):
    result = verdict(rows)
    assert result["passed"] is passed
    if reason:
        assert re.search(reason, result["refused_because"])
    else:
        assert result["refused_because"] is None


def test_verdict_reports_mean_dice_and_the_worst_case():
    result = verdict({"a": case(1.0, {"cord": 0.70}, {"cord": 0.702}), "b": case(0.9997, {"cord": 0.60}, {"cord": 0.597})})
    assert result["organs"]["cord"] == pytest.approx({"dice_fp32": 0.65, "dice_int8": 0.6495, "mean_dice_change": -0.0005,
                                                      "abs_dice_change": 0.003, "worst_case": "b", "cases": 2})
    assert result["agreement"] == {"worst": 0.9997, "worst_case": "b"}


def test_evenly_spreads_from_first_to_last():
    assert evenly(list(range(10)), 4) == [0, 3, 6, 9]
    assert evenly([1, 2], 5) == [1, 2]


def test_calibration_windows_are_the_windows_predict_runs(tiny_model):
    """Per case: every window `predict` slides over the preprocessed scan, (1, C, x, y, z), as it sees them."""
    predictor = Predictor(tiny_model, device="cpu", precision="fp32", backend="torch", tta=False)
    config = read_run_config(tiny_model)
    from medseg.data.datasets import load_dataset

    cases = [c for c in load_dataset(config.data) if c.name in config.split["train"]][:2]
    windows = calibration_windows(predictor, cases, limit=1000)
    expected = 0
    for one in cases:
        volume, _, _ = predictor.preprocess(*predictor.read(list(one.images)))
        sizes = [max(n, r) for n, r in zip(volume.shape[1:], config.network.patch_size)]
        expected += len(list(itertools.product(*(window_starts(n, r, predictor.overlap)
                                                 for n, r in zip(sizes, config.network.patch_size)))))
    assert len(windows) == expected > len(cases)
    assert all(w.shape == (1, 1, 16, 16, 16) and w.dtype == np.float32 for w in windows)
    assert len(calibration_windows(predictor, cases, limit=4)) == 4  # at most the limit, two a case


# ------------------------------------------------------------------------------------ medseg quantize


@needs_nncf
def test_quantize_writes_the_record_and_the_int8_network(quantized):
    folder, record = quantized
    config = read_run_config(folder)
    assert json.loads(record_path(folder).read_text()) == record
    assert record["weights"] == "best.pt"
    assert record["weights_sha256"] == hashlib.sha256((folder / "best.pt").read_bytes()).hexdigest()
    assert record["window"] == [1, 16, 16, 16]
    assert record["openvino"] == openvino_version() and record["nncf"] == nncf_version()
    assert set(record["quantisation"]["calibration_cases"]) <= set(config.split["train"])
    assert record["check"]["cases"] == config.split["validation"] == list(record["per_case"])
    organs = set(config.task.label_names.values())
    for row in record["per_case"].values():
        assert 0.5 < row["agreement"] <= 1.0  # int8 is close to f32, but not necessarily equal
        assert set(row["dice_fp32"]) == set(row["dice_int8"]) == organs
    means = {organ: [(row["dice_fp32"][organ], row["dice_int8"][organ]) for row in record["per_case"].values()
                     if row["dice_fp32"][organ] is not None and row["dice_int8"][organ] is not None] for organ in organs}
    worst = max(abs(np.mean([b for _, b in pairs]) - np.mean([a for a, _ in pairs])) for pairs in means.values() if pairs)
    agreement = min(row["agreement"] for row in record["per_case"].values())
    assert record["passed"] is (worst <= MAX_DICE_CHANGE and agreement >= MIN_AGREEMENT)
    assert record["agreement"]["worst"] == agreement
    assert (record["refused_because"] is None) is record["passed"]

    xml = folder / record["int8_ir"]
    assert xml.parent.parent == folder / "openvino" / record["cache_key"]  # inside the f32 network's entry
    assert not [p for p in xml.parent.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    types = op_types(xml)
    assert list(types.values()).count("FakeQuantize") > 5  # quantised
    head = record["quantisation"]["f32_layers"]
    assert head and all("output_block" in name and types[name] == "Convolution" for name in head)
    import openvino as ov

    heads = [op for op in ov.Core().read_model(xml).get_ops() if op.get_friendly_name() in head]
    assert all(op.input_value(0).get_node().get_type_name() != "FakeQuantize" for op in heads)  # kept in f32


@needs_nncf
def test_quantize_needs_a_writable_model_folder(tiny_model, tmp_path, monkeypatch):
    folder = copy_model(tiny_model, tmp_path / "model", cache=False)
    (folder / "openvino").write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the f32 network lands in the user cache
    with pytest.raises(InputError, match=r"model/openvino: the f32 OpenVINO network is not cached there .* must be "
                                         r"writable$"):
        quantize_model(folder, echo=lambda line: None)


@needs_nncf
def test_predict_int8_uses_the_checked_network_and_writes_the_mask_on_the_scan_grid(passed_copy, tmp_path, capsys):
    scan, out = validation_scan(passed_copy), tmp_path / "out"
    name = scan.name.removesuffix(".nii.gz")
    code = main(["predict", str(scan), "-o", str(out), "-m", str(passed_copy), "--device", "cpu",
                 "--precision", "int8", "--no-overlays"])
    assert code == 0, capsys.readouterr().err
    assert f"{passed_copy.name}: openvino int8; network read" in capsys.readouterr().err
    mask, source = sitk.ReadImage(str(out / f"{name}_seg.nii.gz")), sitk.ReadImage(str(scan))
    assert mask.GetSize() == source.GetSize()
    np.testing.assert_allclose(mask.GetSpacing(), source.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(mask.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(mask.GetDirection(), source.GetDirection(), atol=1e-6)

    # the same network the check measured: its agreement with f32 is the record's, to the voxel
    record = json.loads(record_path(passed_copy).read_text())
    f32 = Predictor(passed_copy, device="cpu", precision="fp32", backend="openvino").predict(scan).labels
    int8 = sitk.GetArrayFromImage(mask).transpose(2, 1, 0)
    assert np.mean(int8 == f32) == record["per_case"][name]["agreement"]


@needs_nncf
def test_auto_precision_takes_checked_int8_only_without_bf16_units(passed_copy, quantized, tiny_model, tmp_path):
    """On a CPU without bf16 units `auto` runs the int8 network that passed its check; with bf16 units, with torch
    asked for, without a passed record, or on other weights, it does not. The CPU is a parameter here, the rest is
    real: records, IRs, hashes."""
    weights, window, cpu = passed_copy / "best.pt", (1, 16, 16, 16), torch.device("cpu")
    assert auto_takes_int8(weights, window, "auto", cpu, native_bf16=False)
    assert not auto_takes_int8(weights, window, "auto", cpu, native_bf16=True)
    assert not auto_takes_int8(weights, window, "torch", cpu, native_bf16=False)
    refused = copy_model(quantized[0], tmp_path / "refused")
    edit_json(record_path(refused), passed=False, refused_because="test")
    assert not auto_takes_int8(refused / "best.pt", window, "auto", cpu, native_bf16=False)
    assert not auto_takes_int8(tiny_model / "best.pt", window, "auto", cpu, native_bf16=False)  # never quantised
    state = load_checkpoint(weights)
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, weights)
    assert not auto_takes_int8(weights, window, "auto", cpu, native_bf16=False)  # stale record: auto falls back
    bundle = load_model(passed_copy, "cpu", precision="auto", backend="openvino")  # no error either
    assert bundle.network.precision in ("f32", "bf16")


@needs_nncf
def test_predict_hints_at_quantize_where_auto_ran_fp32(passed_copy, tiny_model):
    """`auto` that ended in f32 (what a CPU without bf16 units gets) hints at `medseg quantize`; not after an
    explicit precision, and not once the int8 network runs."""
    fp32 = Predictor(tiny_model, device="cpu", precision="fp32", backend="torch")
    assert f"`medseg quantize {tiny_model}` (once)" in quantize_hint(fp32, "auto")
    assert quantize_hint(fp32, "fp32") is None
    assert quantize_hint(Predictor(passed_copy, device="cpu", precision="int8"), "auto") is None
    bf16 = Predictor(tiny_model, device="cpu", precision="bf16", backend="torch")
    assert quantize_hint(bf16, "auto") is None


@needs_nncf
def test_refused_int8_is_a_one_line_error(quantized, tmp_path, capsys):
    folder = copy_model(quantized[0], tmp_path / "model")
    edit_json(record_path(folder), passed=False, refused_because="bladder |dDice| 0.0065 > 0.005 (blob_4)")
    out = tmp_path / "out"
    code = main(["predict", str(validation_scan(folder)), "-o", str(out), "-m", str(folder), "--device", "cpu",
                 "--precision", "int8"])
    assert code == 2
    assert capsys.readouterr().err == (f"error: {folder}: int8 refused by its check ({record_path(folder)}): bladder "
                                       f"|dDice| 0.0065 > 0.005 (blob_4); use --precision fp32 or bf16\n")
    assert not out.exists()


@needs_nncf
def test_missing_record_says_what_to_run(tiny_model, tmp_path, capsys):
    folder = copy_model(tiny_model, tmp_path / "model", cache=False)
    code = main(["predict", str(validation_scan(folder)), "-o", str(tmp_path / "out"), "-m", str(folder),
                 "--precision", "int8"])
    assert code == 2
    assert capsys.readouterr().err == (f"error: {folder}: no int8 network; make and check one with `medseg quantize "
                                       f"{folder}` (needs pip install \"medseg[int8]\")\n")


@needs_nncf
def test_changed_checkpoint_invalidates_int8(passed_copy):
    window = (1, 16, 16, 16)
    assert int8_network(passed_copy / "best.pt", window, "openvino", torch.device("cpu")).precision == "int8"
    old = (passed_copy / json.loads(record_path(passed_copy).read_text())["int8_ir"]).parent
    state = load_checkpoint(passed_copy / "best.pt")
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, passed_copy / "best.pt")
    with pytest.raises(InputError, match=r"best.pt has changed since its int8 network was checked .* run `medseg "
                                         r"quantize .*` again"):
        load_model(passed_copy, "cpu", precision="int8", backend="auto")
    load_model(passed_copy, "cpu", precision="fp32", backend="openvino")  # the new weights' f32 entry ...
    assert not old.exists()  # ... replaces the stale one, its int8 network with it


@needs_nncf
def test_changed_int8_network_is_refused(passed_copy):
    bin_file = (passed_copy / json.loads(record_path(passed_copy).read_text())["int8_ir"]).with_suffix(".bin")
    with open(bin_file, "r+b") as file:
        first = file.read(1)
        file.seek(0)
        file.write(bytes([first[0] ^ 1]))
    with pytest.raises(InputError, match="the int8 network checked in .* is missing or has changed"):
        load_model(passed_copy, "cpu", precision="int8")


@pytest.mark.parametrize("backend, device, message", [
    pytest.param("torch", "cpu", "--precision int8 runs with OpenVINO, not torch", id="torch"),
    pytest.param("openvino", "cuda", "--precision int8 runs with OpenVINO on the CPU, not on cuda", id="gpu"),
])
def test_int8_needs_openvino_on_the_cpu(tmp_path, backend, device, message):
    with pytest.raises(InputError, match=message):
        int8_network(tmp_path / "best.pt", (1, 16, 16, 16), backend, torch.device(device))


def test_int8_is_a_predict_precision_only(tiny_model, capsys):
    assert main(["calibrate", str(tiny_model), "--precision", "int8"]) == 2
    assert "--precision 'int8' is not one of auto, bf16, fp32" in capsys.readouterr().err


MISSING_NNCF = """
import sys
sys.modules["nncf"] = None  # `import nncf` now fails as if it were not installed
from medseg.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_quantize_without_nncf_is_a_one_line_error(tiny_model, tmp_path):
    folder = copy_model(tiny_model, tmp_path / "model", cache=False)
    done = subprocess.run([sys.executable, "-c", MISSING_NNCF, "quantize", str(folder)], check=False,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == 'error: medseg quantize: NNCF is not installed (pip install "medseg[int8]")\n'
    assert not (folder / "openvino").exists()  # refused before any work
