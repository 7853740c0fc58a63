"""int8 inference: NNCF post-training quantisation of the OpenVINO network, offered only where it kept the
model's accuracy (issue 21). Optional: `pip install "medseg[int8]"` (NNCF; OpenVINO comes with it).

`medseg quantize MODEL` (`quantize_model`):

1. The f32 OpenVINO network through the conversion cache (`medseg.infer.backends`), in
   `<model>/openvino/<key>/`; the model folder must be writable, since the verdict is kept there.
2. Calibration windows: the windows `medseg predict` runs over up to `calibration_cases` of the run's
   training cases (config.json's split, spread over it), read and preprocessed by `Predictor` itself
   (model grid, body box, normalisation, window positions and padding, the task's flips), at most
   `MAX_WINDOWS` (NNCF's default subset) spread evenly over the cases.
3. `nncf.quantize` with preset MIXED (symmetric int8 weights, asymmetric activations: NNCF's choice for
   activations that are not ReLU, and DynUNet's LeakyReLU and UNet's PReLU let negatives through), fast
   bias correction and the default model type. The convolutions that produce the logits stay in f32
   (`ignored_scope`): their output decides the argmax, and a 1x1 head of few channels costs little in f32.
4. The int8 IR goes into `<entry>/int8/` (a temporary folder renamed into place), so a changed checkpoint
   or a new OpenVINO, which replace the entry, take it away with the f32 network.
5. The check: the run's validation cases (or the first `cases` of them) predicted as `medseg predict`
   does, with the int8 network and with the f32 OpenVINO network; each organ's Dice against the reference
   on the organs the case contoured (an organ absent from the reference and from one prediction has no
   Dice there and is left out: the agreement counts those voxels), and the share of voxels whose label
   int8 keeps. Passed: each organ's mean Dice over the cases within MAX_DICE_CHANGE of f32 (issue 21's
   "per-organ Dice within 0.005 of fp32") and agreement >= MIN_AGREEMENT for every case. The worst case is
   recorded, not gated: one voxel of a small organ moves its Dice by ~0.003, and bf16 (`auto` on bf16 CPUs)
   moves single cases by up to 0.007 too (docs/performance.md).
6. `<model>/openvino/int8.json` (`RECORD_NAME`), written atomically: the checkpoint's SHA-256, the cache
   key, window, versions, calibration cases and windows, per organ the mean Dice of both, their difference
   and the worst case's |ΔDice|, per case the agreement, `passed` and why not.

`medseg predict --precision int8` and `auto` on CPUs without bf16: `medseg.infer.int8`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from medseg.errors import InputError
from medseg.infer.backends import CACHE_FOLDER, IR_NAME, file_sha256, key_fields, key_of, openvino_version, save_ir
from medseg.infer.int8 import INT8_FOLDER, NNCF_HINT, compiled_int8, nncf_version, record_path
from medseg.infer.predictor import Predictor, checkpoint_file, load_model
from medseg.io import write_text
from medseg.model.folder import read_run_config

CALIBRATION_CASES = 16  # training cases the calibration windows come from (8 gave the headneck cord +0.0049, 16 +0.0021)
MAX_WINDOWS = 300  # calibration windows at most (NNCF's default subset size)
MAX_DICE_CHANGE = 0.005  # issue 21: every organ's mean Dice over the cases within this of f32's ...
MIN_AGREEMENT = 0.999  # ... and at least this share of every case's voxels the same label
PRESET = "mixed"  # nncf.QuantizationPreset: symmetric weights, asymmetric activations
CONVOLUTIONS = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData")


# ------------------------------------------------------------------------------------ medseg quantize


def quantize_model(folder: str | Path, data: str | Path | None = None, cases: int | None = None,
                   calibration_cases: int = CALIBRATION_CASES, echo: Callable[[str], None] = print) -> dict:
    """Quantise a model folder's network to int8, check it against f32 and write int8.json (the module's steps).

    Args:
        folder: a run folder of `medseg train`.
        data: the dataset holding its training and validation cases; default: the one it was trained on.
        cases: check on the first this many validation cases; None: all of them.
        calibration_cases: training cases whose windows calibrate the int8 ranges.
    Returns:
        int8.json's data (`passed` says whether `--precision int8` will take it).
    Raises:
        InputError: NNCF or OpenVINO missing, no writable cache in the model folder, cases missing.
    """
    folder = Path(folder)
    if nncf_version() is None:
        raise InputError(f"medseg quantize: NNCF is not installed ({NNCF_HINT})")
    if openvino_version() is None:
        raise InputError(f"medseg quantize: OpenVINO is not installed ({NNCF_HINT})")
    config = read_run_config(folder)
    fp32 = Predictor(load_model(folder, "cpu", precision="fp32", backend="openvino"))
    entry = fp32.bundle.network.cache
    if entry is None or entry.parent != folder / CACHE_FOLDER:
        raise InputError(f"{folder / CACHE_FOLDER}: the f32 OpenVINO network is not cached there ({entry or 'not cached'}); "
                         f"the int8 network and its check are kept in the model folder, which must be writable")
    calibration = training_cases(folder, config, data, calibration_cases)
    check = validation_cases(folder, data, cases)
    echo(f"{folder.name}: calibrating on {len(calibration)} training case(s), checking on {len(check)} validation case(s)")
    start = time.perf_counter()
    windows = calibration_windows(fp32, calibration)
    model, head = quantize_network(entry / IR_NAME, windows)
    int8_entry = save_ir(model, entry / INT8_FOLDER, replace=True)
    quantised = {"preset": PRESET, "fast_bias_correction": True, "model_type": None, "f32_layers": head,
                 "calibration_cases": [c.name for c in calibration], "calibration_windows": len(windows),
                 "seconds": round(time.perf_counter() - start, 1)}
    start = time.perf_counter()
    int8 = Predictor(dataclasses.replace(fp32.bundle, network=compiled_int8(int8_entry)))
    per_case = check_cases(fp32, int8, check, echo)
    record = {**verdict(per_case), **about(folder, entry, int8_entry, fp32), "quantisation": quantised,
              "check": {"dataset": str(data or config.data), "cases": [c.name for c in check],
                        "against": "the f32 OpenVINO network (--backend openvino --precision fp32)",
                        "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - start, 1)},
              "per_case": per_case}
    write_text(json.dumps(record, indent=2), record_path(folder))
    return record


def about(folder: Path, entry: Path, int8_entry: Path, fp32: Predictor) -> dict:
    """What ties int8.json to the weights, runtime and IR it was measured with."""
    import nncf

    from medseg import __version__

    weights = checkpoint_file(folder)
    window = [fp32.bundle.plan.in_channels, *fp32.bundle.plan.patch_size]
    fields = key_fields(weights, window, openvino_version())
    return {"weights": weights.name, "weights_sha256": fields["weights_sha256"], "cache_key": key_of(fields),
            "window": window, "int8_ir": (int8_entry / IR_NAME).relative_to(folder).as_posix(),
            "int8_ir_sha256": file_sha256(int8_entry / IR_NAME, (int8_entry / IR_NAME).with_suffix(".bin")),
            "openvino": openvino_version(), "nncf": nncf.__version__, "medseg": __version__,
            "created": datetime.now().isoformat(timespec="seconds")}


def training_cases(folder: Path, config, data: str | Path | None, count: int) -> list:
    """Up to `count` of the run's training cases (config.json's split), spread over it, from `data`."""
    from medseg.data.datasets import load_dataset

    names = evenly(list(config.split.get("train", [])), count)
    root = Path(data or config.data)
    found = {case.name: case for case in load_dataset(root, "train") if case.name in names}
    if not names or len(found) < len(names):
        missing = sorted(set(names) - set(found))[:3] or ["(none listed in config.json)"]
        raise InputError(f"{root}: lacks the training case(s) {', '.join(missing)} of {folder}'s split; pass the "
                         f"dataset it was trained on (--data)")
    return [found[name] for name in names]


def validation_cases(folder: Path, data: str | Path | None, count: int | None) -> list:
    """The run's validation cases it did not train on (or the first `count`), with their references."""
    from medseg.infer.calibration import unseen_cases

    return unseen_cases([folder], data)[:count]


def evenly(items: Sequence, count: int) -> list:
    """At most `count` of `items`, spread evenly from the first to the last."""
    if len(items) <= count:
        return list(items)
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, count).round().astype(int))]


class WindowRecorder:
    """Stands in for the network during one `Predictor.logits` pass: keeps the windows, answers zeros."""

    def __init__(self, classes: int):
        self.classes, self.windows = classes, []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, C, x, y, z) -> zeros (B, K, x, y, z); each window kept as a (1, C, x, y, z) float32 array."""
        self.windows += [window[None].float().numpy().copy() for window in batch]
        return torch.zeros(batch.shape[0], self.classes, *batch.shape[2:])


def calibration_windows(predictor: Predictor, cases: Sequence, limit: int = MAX_WINDOWS) -> list[np.ndarray]:
    """The windows `predictor` would run over each case's scan, at most `limit` in all, spread evenly."""
    per_case, windows = max(1, limit // max(len(cases), 1)), []
    for case in cases:
        volume, _, _ = predictor.preprocess(*predictor.read(list(case.images)))
        recorder = WindowRecorder(predictor.bundle.plan.out_channels)
        Predictor(dataclasses.replace(predictor.bundle, network=recorder), tta=predictor.tta).logits(volume)
        windows += evenly(recorder.windows, per_case)
    return windows


def quantize_network(xml: Path, windows: Sequence[np.ndarray], fast_bias_correction: bool = True):
    """The f32 IR at `xml` quantised by NNCF on `windows`; returns (int8 model, the f32-kept head layers).
    `fast_bias_correction=False`: NNCF's full bias correction (`benchmarks/probe_int8.py` compares them)."""
    import contextlib
    import logging
    import sys

    import nncf
    import openvino as ov

    model = ov.Core().read_model(xml)
    head = head_convolutions(model)
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.WARNING)  # its INFO lines (which nodes it left out) go to stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its progress bars too: stdout is for results
            quantised = nncf.quantize(model, nncf.Dataset(list(windows)), preset=nncf.QuantizationPreset(PRESET),
                                      subset_size=len(windows), fast_bias_correction=fast_bias_correction,
                                      ignored_scope=nncf.IgnoredScope(names=head))
    finally:
        logger.setLevel(level)
    return quantised, head


def head_convolutions(model) -> list[str]:
    """Names of the convolutions whose outputs reach the model's outputs with no convolution in between."""
    todo = [result.input_value(0).get_node() for result in model.get_results()]
    seen, found = set(), set()
    while todo:
        node = todo.pop()
        name = node.get_friendly_name()
        if name in seen:
            continue
        seen.add(name)
        if node.get_type_name() in CONVOLUTIONS:
            found.add(name)
            continue
        todo += [value.get_node() for value in node.input_values()
                 if value.get_node().get_type_name() not in ("Constant", "Parameter")]
    return sorted(found)


# ------------------------------------------------------------------------------------ the check


def check_cases(fp32: Predictor, int8: Predictor, cases: Sequence, echo: Callable[[str], None] = print) -> dict:
    """Per case: each contoured organ's Dice with f32 and with int8 (None: no Dice), and their agreement."""
    from medseg.io import read_label

    rows = {}
    for case in cases:
        before, after = fp32.predict(list(case.images)).labels, int8.predict(list(case.images))
        reference, grid = read_label(case.label, fp32.task.dimensions)
        if not grid.matches(after.grid):
            raise InputError(f"{case.label}: label grid ({grid.describe()}) differs from its image's "
                             f"({after.grid.describe()})")
        organs = {i: n for i, n in fp32.task.label_names.items() if case.contoured is None or n in case.contoured}
        rows[case.name] = {"agreement": float(np.mean(after.labels == before)),
                           "dice_fp32": organ_dice(reference, before, organs),
                           "dice_int8": organ_dice(reference, after.labels, organs)}
        echo(f"  {case.name}: agreement {rows[case.name]['agreement']:.5f}")
    return rows


def organ_dice(reference: np.ndarray, labels: np.ndarray, organs: Mapping[int, str]) -> dict[str, float | None]:
    """Each organ's Dice of `labels` against `reference` (None where the organ is in neither)."""
    from medseg.evaluate.metrics import confusion, dice

    values = {name: dice(*confusion(reference == i, labels == i)[:3]) for i, name in organs.items()}
    return {name: None if np.isnan(value) else float(value) for name, value in values.items()}


def verdict(per_case: Mapping[str, Mapping]) -> dict:
    """Per organ the mean Dice of both, their difference (gated) and the worst case's |ΔDice| (recorded); the
    worst agreement (gated); passed."""
    organs, failures = {}, []
    for organ in dict.fromkeys(o for row in per_case.values() for o in row["dice_fp32"]):
        pairs = {case: (row["dice_fp32"][organ], row["dice_int8"][organ]) for case, row in per_case.items()
                 if row["dice_fp32"].get(organ) is not None and row["dice_int8"].get(organ) is not None}
        if not pairs:
            continue
        worst = max(pairs, key=lambda case: abs(pairs[case][1] - pairs[case][0]))
        before, after = float(np.mean([a for a, _ in pairs.values()])), float(np.mean([b for _, b in pairs.values()]))
        organs[organ] = {"dice_fp32": before, "dice_int8": after, "mean_dice_change": after - before,
                         "abs_dice_change": abs(pairs[worst][1] - pairs[worst][0]), "worst_case": worst,
                         "cases": len(pairs)}
        if abs(after - before) > MAX_DICE_CHANGE:
            failures.append(f"{organ} mean Dice {before:.4f} -> {after:.4f} over {len(pairs)} case(s): "
                            f"|dDice| {abs(after - before):.4f} > {MAX_DICE_CHANGE}")
    worst_case = min(per_case, key=lambda case: per_case[case]["agreement"], default=None)
    agreement = per_case[worst_case]["agreement"] if worst_case else None
    if agreement is not None and agreement < MIN_AGREEMENT:
        failures.append(f"agreement {agreement:.5f} < {MIN_AGREEMENT} ({worst_case})")
    if not per_case:
        failures.append("no validation case was checked")
    return {"passed": not failures, "refused_because": "; ".join(failures) or None,
            "criteria": {"max_abs_mean_dice_change": MAX_DICE_CHANGE, "min_agreement": MIN_AGREEMENT,
                         "over": "each organ's mean Dice over the validation cases; agreement: every case"},
            "organs": organs, "agreement": {"worst": agreement, "worst_case": worst_case}}


def format_record(record: Mapping) -> list[str]:
    """int8.json as terminal lines: one per organ, then the verdict."""
    lines = [f"int8 against f32 OpenVINO on {len(record['per_case'])} validation case(s) "
             f"(mean Dice f32 -> int8; worst case's |dDice|, not gated):"]
    for organ, entry in record["organs"].items():
        lines.append(f"  {organ:<22} {entry['dice_fp32']:.4f} -> {entry['dice_int8']:.4f}  "
                     f"worst {entry['abs_dice_change']:.4f} ({entry['worst_case']})")
    worst = record["agreement"]["worst"]
    lines.append(f"  worst label agreement {'-' if worst is None else format(worst, '.5f')}")
    if record["passed"]:
        lines.append("passed: `medseg predict --precision int8` will use it")
    else:
        lines.append(f"refused: {record['refused_because']}")
    return lines
