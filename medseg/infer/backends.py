"""Inference backends: what runs the network on each batch of windows.

- `torch`: the PyTorch network, laid out by `medseg.runtime.prepare_network` (every device).
- `openvino`: the same eval-mode network (main output only: no deep-supervision heads) converted by
  OpenVINO and compiled for the CPU with `INFERENCE_PRECISION_HINT` f32 or bf16, as
  `medseg.runtime.resolve_precision` decides. It fuses each convolution with its instance norm and
  activation: on one core of an AVX512-BF16 CPU (Zen 4) `medseg predict` ran 1.2x faster than with
  torch in fp32 and 1.15x in bf16 (benchmarks/bench_backends.py, docs/performance.md).
  Optional: `pip install "medseg[openvino]"`.
- `--precision int8` (OpenVINO only): the folder's int8 network, made by NNCF post-training quantisation
  (`medseg quantize`) and taken only where its check against f32 on the validation cases passed
  (`medseg.infer.quantize`); never chosen by `auto`.

`auto` takes torch on GPUs and where OpenVINO is not installed. On the CPU it times a batch of windows
through both, once per machine, precision, thread count and batch size (`faster_backend`; the verdict is
kept beside the cached network in `speed.json`), and takes the faster: OpenVINO won on most networks
measured, but not everywhere (the head-and-neck UNet in bf16 on 2 threads of an AMX Xeon: 0.92x).

Everything else stays as it is: the same windows, Gaussian blending and flips
(`medseg.infer.stitching`, `medseg.infer.tta`); only the callable that maps a batch of windows
(B, C, x, y, z) to logits (B, K, x, y, z) changes.

Conversion takes 5-20 s for a task's network, compilation ~0.2 s, so the converted network (OpenVINO
IR: network.xml + network.bin, f32 weights) is cached once per checkpoint in `<model>/openvino/<key>/`,
where the key hashes the checkpoint file's bytes, the window's channels and shape and the OpenVINO
version: a changed checkpoint gets a new key (and the stale entry is removed). The batch size is
left dynamic (measured as fast as a fixed one) and the precision is chosen at compilation, so one
entry serves every batch and precision; an int8 network lives in the entry's `int8/` folder, so it goes
with the entry it was quantised from. Entries are written to a temporary folder and renamed into
place. Where the model folder cannot be written the cache lives under the user's cache folder
(`user_cache_dir`), and where neither can, the network is converted in memory on every load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from medseg.errors import InputError

BACKENDS = ("auto", "torch", "openvino")
SPEED_FILE = "speed.json"  # in a cache entry: which backend ran a batch faster, per machine (`faster_backend`)
INT8 = "int8"  # `--precision int8`: the model's checked int8 OpenVINO network (medseg.infer.quantize); never 'auto'
INSTALL_HINT = 'pip install "medseg[openvino]"'
CACHE_FOLDER = "openvino"  # inside the model folder
IR_NAME = "network.xml"  # + network.bin beside it
CACHE_FORMAT = 1  # bump when what a cache entry holds changes

log = logging.getLogger("medseg.infer.backends")


def openvino_version() -> str | None:
    """The installed OpenVINO's version; None where it is not installed (or cannot be imported)."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.get_version()


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto', 'torch' or 'openvino' -> 'torch' or 'openvino' for `device`.

    Raises:
        InputError: an unknown name; 'openvino' on a GPU, or where OpenVINO is not installed.
    """
    if backend not in BACKENDS:
        raise InputError(f"backend '{backend}' is not one of {', '.join(BACKENDS)}")
    if backend == "torch" or (backend == "auto" and device.type != "cpu"):
        return "torch"
    if device.type != "cpu":
        raise InputError(f"--backend openvino runs on the CPU, not on {device}: use --device cpu or --backend torch")
    if openvino_version() is None:
        if backend == "openvino":
            raise InputError(f"--backend openvino: OpenVINO is not installed ({INSTALL_HINT})")
        return "torch"
    return "openvino"


def backend_network(network: torch.nn.Module, backend: str, device: torch.device, precision: str,
                    weights: Path, window: Sequence[int], batch: int = 4):
    """What the windows go through: `network` prepared for torch, or compiled by OpenVINO.

    Args:
        network: the loaded network in fp32 (not yet prepared); used up by this call.
        backend: 'auto', 'torch' or 'openvino' (`resolve_backend`; 'auto' on the CPU: `faster_backend`).
        precision: 'fp32' or 'bf16', already resolved for `device`.
        weights, window: the checkpoint file and one window's (C, x, y, z), for `openvino_network`.
        batch: windows a forward takes (the task's `sw_batch_size`), for `faster_backend`.
    Returns:
        (callable (B, C, x, y, z) -> (B, K, x, y, z), 'torch' or 'openvino').
    """
    from medseg.runtime import prepare_network

    if resolve_backend(backend, device) == "openvino":
        from openvino.frontend import GeneralFailure, NotImplementedFailure, OpConversionFailure

        failures = (OpConversionFailure, NotImplementedFailure, GeneralFailure, RuntimeError, TypeError, ValueError)
        try:
            compiled = openvino_network(network.eval(), weights, window, precision)
        except failures as error:  # OpenVINO cannot convert or compile this network: torch runs it
            if backend == "openvino":
                raise InputError(f"{weights}: OpenVINO cannot run this network ({type(error).__name__}: "
                                 f"{str(error).strip()[:200]}); use --backend torch") from None
            log.warning("OpenVINO cannot run this network (%s); using torch", error)
        else:
            if backend == "openvino":
                return compiled, "openvino"
            prepared = prepare_network(network, device, precision).eval()
            if faster_backend(compiled, prepared, (batch, *window), device, precision) == "openvino":
                return compiled, "openvino"
            return prepared, "torch"
    return prepare_network(network, device, precision).eval(), "torch"


def faster_backend(compiled: "OpenVINONetwork", prepared: torch.nn.Module, batch_shape: Sequence[int],
                   device: torch.device, precision: str, repeats: int = 3) -> str:
    """'openvino' or 'torch': which ran a batch of windows faster here (min of `repeats`, after a warm-up).

    The verdict is kept in the cache entry's speed.json under this machine's CPU, thread count,
    precision and batch shape, so the timing (a few seconds) is paid once, not per scan.
    """
    from medseg.io import write_text
    from medseg.runtime import autocast, cpu_name

    signature = f"{cpu_name()}; {torch.get_num_threads()} threads; {precision}; batch {list(batch_shape)}"
    record = compiled.cache / SPEED_FILE if compiled.cache else None
    try:
        known = json.loads(record.read_text()) if record and record.is_file() else {}
    except (OSError, ValueError):  # unreadable or cut short: time again
        known = {}
    if signature in known:
        return known[signature]["faster"]
    windows = torch.randn(*batch_shape)
    seconds = {"torch": float("inf"), "openvino": float("inf")}
    with torch.inference_mode(), autocast(device, precision):
        for round_ in range(repeats + 1):
            for name, run in (("torch", prepared), ("openvino", compiled)):
                start = time.perf_counter()
                run(windows)
                if round_:  # the first round warms both up
                    seconds[name] = min(seconds[name], time.perf_counter() - start)
    faster = min(seconds, key=seconds.get)
    log.info("backend auto: %s (a batch of windows: torch %.3f s, openvino %.3f s)", faster, seconds["torch"],
             seconds["openvino"])
    if record:
        known[signature] = {"faster": faster, "seconds": {k: round(v, 6) for k, v in seconds.items()}}
        try:
            write_text(json.dumps(known, indent=2), record)
        except OSError as error:
            log.warning("cannot keep the backend timing in %s (%s)", record, error)
    return faster


def describe_backend(predictor) -> str:
    """One line for `medseg predict`'s log: backend, precision and, for OpenVINO, where its network came from.

    Args:
        predictor: a `Predictor` (its `bundle`) or an ensemble of them (`members`; the first is described).
    """
    members = getattr(predictor, "members", None) or [predictor]
    bundle = members[0].bundle
    text = bundle.network.describe() if bundle.backend == "openvino" else f"torch {bundle.precision} on {bundle.device}"
    return text + (f" (x{len(members)} models)" if len(members) > 1 else "")


def user_cache_dir() -> Path:
    """Where converted networks go when the model folder is read-only: ~/.cache/medseg/openvino (XDG)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "medseg" / CACHE_FOLDER


# ------------------------------------------------------------------------------------ the network


class OpenVINONetwork:
    """A compiled OpenVINO network, called like the torch one.

    Attributes:
        precision: 'f32' or 'bf16', the compiled inference precision.
        cache: the cache entry's folder (None: not cached, converted in memory).
        converted: whether this load converted the network (False: read from `cache`).
        seconds: how long converting (or reading) and compiling took.
    """

    def __init__(self, compiled, precision: str, cache: Path | None, converted: bool, seconds: float):
        self.precision, self.cache, self.converted, self.seconds = precision, cache, converted, seconds
        self._request = compiled.create_infer_request()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, C, x, y, z) float32 -> (B, K, x, y, z) float32 logits, on the CPU."""
        inputs = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self._request.infer({0: inputs})[0])  # a copy: the request reuses its buffer

    def kernels(self) -> dict[str, int]:
        """How many layers run which compiled kernel, 'layer type: kernel (precision)', e.g.
        'Convolution: brgconv_avx512_amx_I8 (u8)': which instruction set and precision each one got."""
        from collections import Counter

        found = Counter()
        for op in self._request.get_compiled_model().get_runtime_model().get_ops():
            info = op.get_rt_info()
            text = {k: info[k].astype(str) for k in ("layerType", "primitiveType", "runtimePrecision") if k in info}
            if text.get("layerType") not in (None, "Input", "Output", "Const"):
                found[f"{text['layerType']}: {text.get('primitiveType')} ({text.get('runtimePrecision')})"] += 1
        return dict(sorted(found.items()))

    def describe(self) -> str:
        """One line for the log: precision, and where the converted network came from."""
        source = "converted" if self.converted else "read"
        place = f"cache {self.cache}" if self.cache else "not cached (no writable cache folder)"
        return f"openvino {self.precision}; network {source} and compiled in {self.seconds:.1f} s; {place}"


def openvino_network(network: torch.nn.Module, weights: Path, window: Sequence[int], precision: str,
                     cache_roots: Sequence[Path] | None = None) -> OpenVINONetwork:
    """`network` (eval mode, fp32) as a compiled OpenVINO CPU network, through the conversion cache.

    Args:
        weights: the checkpoint `network`'s weights came from: the cache key hashes its bytes.
        window: (C, x, y, z), one window's channels and shape; the batch size stays free.
        precision: 'fp32' or 'bf16' (`medseg.runtime.resolve_precision`).
        cache_roots: cache folders to try in order; default: `<model>/openvino`, then `user_cache_dir()`.
    Threads: as many as torch uses (`torch.get_num_threads()`: OMP_NUM_THREADS, `set_num_threads`).
    """
    import openvino as ov

    start = time.perf_counter()
    roots = list(cache_roots) if cache_roots is not None else [weights.parent / CACHE_FOLDER, user_cache_dir()]
    key = cache_key(weights, window, ov.get_version())
    model, cache = _cached_model(roots, key)
    converted = model is None
    if converted:
        model = convert(network, window)
        cache = _store(model, roots, key, weights)
    return _compile(model, precision, cache, converted, start)


def openvino_in_memory(network: torch.nn.Module, window: Sequence[int], precision: str) -> OpenVINONetwork:
    """`network`'s current weights compiled by OpenVINO, converted in memory and never cached.

    For weights that live only for a moment (a validation during training: the next one has other
    weights), where hashing and writing a cache entry would be time spent for nothing.
    """
    start = time.perf_counter()
    return _compile(convert(network, window), precision, None, True, start)


def _compile(model, precision: str, cache: Path | None, converted: bool, start: float) -> OpenVINONetwork:
    """Compile for the CPU in f32 or bf16 with torch's thread count; `start`: when converting or reading began."""
    import openvino as ov

    hint = "bf16" if precision == "bf16" else "f32"
    compiled = ov.Core().compile_model(model, "CPU", compile_options(hint))
    return OpenVINONetwork(compiled, hint, cache, converted, time.perf_counter() - start)


def compile_options(hint: str) -> dict:
    """The CPU plugin's settings: `INFERENCE_PRECISION_HINT` 'f32' or 'bf16' (for an int8 network: of the
    layers left unquantised), latency mode, torch's thread count."""
    return {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": torch.get_num_threads()}


def convert(network: torch.nn.Module, window: Sequence[int]):
    """The eval-mode network as an OpenVINO model with a free batch size (TorchScript tracing)."""
    import warnings

    import openvino as ov

    window = [int(n) for n in window]
    example = torch.zeros(1, *window)
    was_training = network.training
    network.eval()  # the main output only: deep-supervision heads exist only in training mode
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about MONAI's shape checks
            return ov.convert_model(network, example_input=example, input=[ov.PartialShape([-1, *window])])
    finally:
        network.train(was_training)


# ------------------------------------------------------------------------------------ the cache


def cache_key(weights: Path, window: Sequence[int], version: str) -> str:
    """16 hex digits from the checkpoint's bytes, the window (C, x, y, z) and the OpenVINO version."""
    return key_of(key_fields(weights, window, version))


def key_fields(weights: Path, window: Sequence[int], version: str) -> dict:
    """What a cache key hashes: the checkpoint's SHA-256, the window, the OpenVINO version, the entry format."""
    return {"weights_sha256": file_sha256(weights), "window": [int(n) for n in window], "openvino": version,
            "format": CACHE_FORMAT}


def key_of(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(*paths: Path) -> str:
    """SHA-256 of the files' bytes, one after another."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _cached_model(roots: Sequence[Path], key: str):
    """(model, entry folder) from the first root holding `key`; (None, None) if none does."""
    import openvino as ov

    for root in roots:
        xml = root / key / IR_NAME
        if xml.is_file():
            try:
                return ov.Core().read_model(xml), root / key
            except RuntimeError as error:  # unreadable entry (e.g. a .bin removed by hand): convert again
                log.warning("OpenVINO cache entry %s is unreadable (%s); converting again", root / key, error)
                shutil.rmtree(root / key, ignore_errors=True)
    return None, None


def _store(model, roots: Sequence[Path], key: str, weights: Path) -> Path | None:
    """Write `model` into the first root that takes it; returns the entry folder (None: none did)."""
    for i, root in enumerate(roots):
        try:
            entry = _write_entry(model, root, key, weights)
        except (OSError, RuntimeError) as error:  # RuntimeError: OpenVINO's own write failures
            log.warning("cannot cache the OpenVINO network in %s (%s)", root, error)
            continue
        if i > 0:
            log.warning("OpenVINO network cached in %s (%s was not writable)", entry, roots[0])
        return entry
    log.warning("OpenVINO network not cached: it will be converted again on every load")
    return None


def _write_entry(model, root: Path, key: str, weights: Path) -> Path:
    """network.xml/.bin and key.json written in a temporary folder, then renamed to `root/key` whole."""
    root.mkdir(parents=True, exist_ok=True)
    about = {"weights": str(weights.resolve()), "key": key}
    entry = save_ir(model, root / key, {"key.json": json.dumps(about, indent=2)})
    _remove_stale(root, key, weights)
    return entry


def save_ir(model, entry: Path, files: dict[str, str] | None = None, replace: bool = False) -> Path:
    """`model` as `entry`/network.xml + .bin (weights as they are: f32 stays f32) and the text `files`,
    written in a temporary folder beside `entry` and renamed into place whole.

    An `entry` already there is kept (another process's finished entry), or with `replace` swapped out.
    """
    import openvino as ov

    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    old = entry.parent / f"{tmp.name}.old"
    try:
        ov.save_model(model, tmp / IR_NAME, compress_to_fp16=False)  # f32 weights: fp32 results unchanged
        for name, text in (files or {}).items():
            (tmp / name).write_text(text + "\n")
        if replace and entry.exists():
            os.rename(entry, old)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / IR_NAME).is_file():  # not another process's finished entry
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return entry


def _remove_stale(root: Path, key: str, weights: Path) -> None:
    """Remove other entries converted from the same checkpoint: its bytes have changed since. In the model
    folder's own cache that is any entry of a checkpoint of that name (the folder may have been moved or copied)."""
    own = root == weights.parent / CACHE_FOLDER
    for other in root.glob("*/key.json"):
        if other.parent.name == key:
            continue
        try:
            source = json.loads(other.read_text()).get("weights")
        except (OSError, ValueError):
            continue
        if source == str(weights.resolve()) or (own and isinstance(source, str) and Path(source).name == weights.name):
            shutil.rmtree(other.parent, ignore_errors=True)
