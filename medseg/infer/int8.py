"""Which int8 network `medseg predict` may run: the rules `medseg quantize`'s record (int8.json) is read by.

`medseg predict --precision int8` (`int8_network`) runs the int8 IR only on OpenVINO on the CPU, and only
where int8.json was measured on these weights with this OpenVINO, passed, and names the IR that is there
(its SHA-256); else a one-line error that says what to run or why int8 was refused. The layers left
unquantised run in f32, as checked. `--precision auto` takes it (`auto_takes_int8`) on a CPU without bf16
units, where the alternative is f32 and int8 ran 1.1-1.8x faster than f32 OpenVINO (held to AVX2); where
the CPU has bf16, bf16 stays the default (as fast or faster, and closer to f32). Making and checking the
network: `medseg.infer.quantize`.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from medseg.errors import ConfigError, InputError
from medseg.infer.backends import (CACHE_FOLDER, INSTALL_HINT, INT8, IR_NAME, OpenVINONetwork, compile_options,
                                   file_sha256, key_fields, key_of, openvino_version, resolve_backend)
from medseg.model.folder import read_folder_json

NNCF_HINT = 'pip install "medseg[int8]"'
RECORD_NAME = "int8.json"  # in <model>/openvino/
INT8_FOLDER = "int8"  # the int8 IR, inside the f32 network's cache entry


def nncf_version() -> str | None:
    """The installed NNCF's version; None where it is not installed (or cannot be imported)."""
    try:
        import nncf
    except ImportError:
        return None
    return nncf.__version__


def record_path(folder: Path) -> Path:
    return Path(folder) / CACHE_FOLDER / RECORD_NAME


def compiled_int8(entry: Path) -> OpenVINONetwork:
    """The int8 IR in `entry` compiled for the CPU; the layers left unquantised in f32, as checked."""
    import openvino as ov

    start = time.perf_counter()
    compiled = ov.Core().compile_model(str(entry / IR_NAME), "CPU", compile_options("f32"))
    return OpenVINONetwork(compiled, INT8, entry, False, time.perf_counter() - start)


# ------------------------------------------------------------------------------------ --precision int8


def int8_network(weights: Path, window: Sequence[int], backend: str, device: torch.device) -> OpenVINONetwork:
    """`--precision int8`: the model folder's int8 network, compiled, where its check allows (the module's rules).

    Raises:
        InputError: not OpenVINO on the CPU; int8.json missing, from other weights or another OpenVINO,
            refused, or its IR missing or changed (each message names the folder and what to do).
    """
    if device.type != "cpu":
        raise InputError(f"--precision int8 runs with OpenVINO on the CPU, not on {device}: use --device cpu")
    if backend == "torch":
        raise InputError("--precision int8 runs with OpenVINO, not torch: use --backend openvino or auto")
    if resolve_backend(backend, device) != "openvino":  # auto where OpenVINO is not installed
        raise InputError(f"--precision int8 runs with OpenVINO, which is not installed ({INSTALL_HINT})")
    folder = weights.parent
    record = read_record(folder)
    return compiled_int8(checked_entry(record, folder, weights, window))


def auto_takes_int8(weights: Path, window: Sequence[int], backend: str, device: torch.device,
                    native_bf16: bool | None = None) -> Path | None:
    """`--precision auto`: the folder of the checked int8 network on a CPU without bf16 units (`native_bf16`:
    default, this CPU's), unless torch is asked for; else None (bf16 where the CPU has it, as before). Never
    an error: OpenVINO missing, or an int8.json missing, refused or stale for these weights, this OpenVINO or
    this IR, and auto falls back."""
    from medseg.runtime import cpu_has_native_bf16

    folder = weights.parent
    if device.type != "cpu" or backend == "torch" or openvino_version() is None or not record_path(folder).is_file():
        return None
    if cpu_has_native_bf16() if native_bf16 is None else native_bf16:
        return None
    try:
        return checked_entry(read_record(folder), folder, weights, window)
    except (InputError, ConfigError):
        return None


def quantize_hint(predictor, precision: str) -> str | None:
    """A line for `medseg predict` where int8 would be the default but the model has no checked int8 network
    yet: `precision` auto, a CPU without bf16 units, the network in f32, NNCF installed."""
    bundle = getattr(predictor, "bundle", None)  # a cross-validation ensemble has none: quantised per fold
    if precision != "auto" or bundle is None or bundle.device.type != "cpu" or bundle.precision != "fp32":
        return None
    if getattr(bundle.network, "precision", None) == INT8 or importlib.util.find_spec("nncf") is None:
        return None  # find_spec: whether NNCF is there, without the seconds of importing it
    return (f"hint: this CPU has no bf16 units; `medseg quantize {bundle.folder}` (once) lets predict run int8 where "
            f"it keeps each organ's Dice, 2.1x faster than torch fp32 on the prostate model (docs/performance.md)")


def read_record(folder: Path) -> dict:
    """The folder's int8.json; an InputError saying how to make it where there is none."""
    path = record_path(folder)
    if not path.is_file():
        raise InputError(f"{folder}: no int8 network; make and check one with `medseg quantize {folder}` "
                         f"(needs {NNCF_HINT})")
    record = read_folder_json(path)
    wanted = ("passed", "weights_sha256", "cache_key", "openvino", "int8_ir", "int8_ir_sha256")
    missing = [key for key in wanted if not isinstance(record, dict) or key not in record]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)} (not an int8 record of `medseg quantize`)")
    return record


def checked_entry(record: Mapping, folder: Path, weights: Path, window: Sequence[int]) -> Path:
    """The int8 IR's folder, where `record` vouches for these weights, this OpenVINO and that IR."""
    path, again = record_path(folder), f"run `medseg quantize {folder}` again"
    fields = key_fields(weights, window, openvino_version())
    if record["weights_sha256"] != fields["weights_sha256"]:
        raise InputError(f"{folder}: {weights.name} has changed since its int8 network was checked ({path}); {again}")
    if record["openvino"] != fields["openvino"]:
        raise InputError(f"{folder}: its int8 network was checked with OpenVINO {record['openvino']}, this is "
                         f"{fields['openvino']}; {again}")
    if not record["passed"]:
        raise InputError(f"{folder}: int8 refused by its check ({path}): {record.get('refused_because')}; "
                         f"use --precision fp32 or bf16")
    ir = folder / record["int8_ir"]
    if record["cache_key"] != key_of(fields) or ir.parent != folder / CACHE_FOLDER / record["cache_key"] / INT8_FOLDER:
        raise InputError(f"{folder}: its network's window has changed since int8 was checked ({path}); {again}")
    if not ir.is_file() or file_sha256(ir, ir.with_suffix(".bin")) != record["int8_ir_sha256"]:
        raise InputError(f"{folder}: the int8 network checked in {path} is missing or has changed; {again}")
    return ir.parent
