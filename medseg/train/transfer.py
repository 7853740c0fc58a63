"""Transfer learning: start a run from another model's weights, optionally with the encoder frozen at first.

`--init-weights` takes a model folder from `medseg train` (its `best.pt`, the weights `medseg predict`
uses; `last.pt` if there is no best) or a checkpoint file (a medseg checkpoint, a `{"state_dict": ...}`
or nnU-Net `{"network_weights": ...}` file, or a bare state dict). Every tensor whose name and shape
match the new network is loaded; the others keep their fresh initialisation, and `init_weights.json`
in the run folder says which and why: `shape_mismatch` (e.g. the output layer of a task with other
labels), `missing` (the source has no such tensor) and `unused` (source tensors the network lacks).

`--freeze-encoder-epochs N` keeps the encoder's weights fixed for the first N epochs (no gradient, so
neither the optimiser's momentum nor its weight decay moves them), so that a new output layer first
learns to read the features the source learnt. "Encoder" per network family is `ENCODERS`.

A resumed run (`--resume` with a `last.pt`) never re-applies the initial weights: it continues from its
checkpoint, and the freeze it was started with is read back from `init_weights.json`.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import torch

from medseg.errors import InputError
from medseg.io import write_text
from medseg.model.folder import load_checkpoint

REPORT_NAME = "init_weights.json"

# The encoder of each network family, as a pattern matched at the start of parameter names: the path
# from the input down to the coarsest features, without skips' decoders and output heads.
ENCODERS = {
    "dynunet": r"(input_block|downsamples|bottleneck)\.",  # input block, downsampling blocks, bottleneck
    "deeplab": r"encoder\.",  # the residual atrous levels (not the ASPP head or the decoder)
    "unet": r"model\.(1\.submodule\.)*(0\.|(?!\d))",  # each level's down block, and the bottom block
    "segresnet": r"(convInit|down_layers)\.",
    "swinunetr": r"(swinViT|encoder\d+)\.",  # the Swin transformer and its residual encoder blocks
}
_WRAPPERS = ("module.", "_orig_mod.")  # DistributedDataParallel and torch.compile prefixes


def check_options(init_weights: Path | None, freeze_epochs: int, processes: int) -> None:
    """Fail before any preprocessing on options that cannot work."""
    if freeze_epochs < 0:
        raise InputError(f"--freeze-encoder-epochs must be 0 or more, got {freeze_epochs}")
    if freeze_epochs and init_weights is None:
        raise InputError("--freeze-encoder-epochs needs --init-weights (a random encoder is not worth freezing)")
    if freeze_epochs and processes > 1:
        raise InputError("--freeze-encoder-epochs runs in one process only (DistributedDataParallel needs every "
                         "parameter to train); drop --nproc or the freeze")
    if init_weights is not None and not Path(init_weights).exists():
        raise InputError(f"{init_weights}: --init-weights not found (a model folder or a checkpoint file)")


def read_weights(source: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The tensors of a model folder or checkpoint file, by name, and the file they came from."""
    source = Path(source)
    path = source
    if source.is_dir():
        path = next((source / n for n in ("best.pt", "last.pt") if (source / n).is_file()), None)
        if path is None:
            raise InputError(f"{source}: no best.pt or last.pt (not a trained medseg model folder)")
    try:
        state = load_checkpoint(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise InputError(f"{path}: not a PyTorch checkpoint of tensors ({str(error).splitlines()[0][:200]})") from None
    for key in ("model", "state_dict", "network_weights"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    weights = {_unwrap(k): v for k, v in state.items() if torch.is_tensor(v)} if isinstance(state, dict) else {}
    if not weights:
        raise InputError(f"{path}: holds no named tensors (expected a model folder's checkpoint or a state dict)")
    return weights, path


def _unwrap(name: str) -> str:
    for prefix in _WRAPPERS:
        name = name.removeprefix(prefix)
    return name


def load_matching(network: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict:
    """Copy every tensor whose name and shape match into `network`; returns what was and was not loaded."""
    own = network.state_dict()
    loaded = [k for k in own if k in weights and weights[k].shape == own[k].shape]
    mismatch = {k: {"source": list(weights[k].shape), "network": list(own[k].shape)}
                for k in own if k in weights and weights[k].shape != own[k].shape}
    network.load_state_dict({**own, **{k: weights[k] for k in loaded}})
    return {"loaded": loaded, "shape_mismatch": mismatch, "missing": [k for k in own if k not in weights],
            "unused": [k for k in weights if k not in own]}


def encoder_names(network: torch.nn.Module, family: str) -> list[str]:
    """Names of the encoder's parameters in a network of `family` (see `ENCODERS`)."""
    if family not in ENCODERS:
        raise InputError(f"--freeze-encoder-epochs: no encoder defined for network '{family}'")
    pattern = re.compile(rf"(net\.)?{ENCODERS[family]}")  # net.: a 2D network inside `networks.Planar`
    return [name for name, _ in network.named_parameters() if pattern.match(name)]


def set_encoder_frozen(network: torch.nn.Module, family: str, frozen: bool) -> int:
    """Switch the encoder's gradients off (frozen) or on; returns how many parameters it holds."""
    names = set(encoder_names(network, family))
    for name, parameter in network.named_parameters():
        if name in names:
            parameter.requires_grad_(not frozen)
    return len(names)


def start_weights(network: torch.nn.Module, folder: Path, family: str, init_weights: Path | None,
                  freeze_epochs: int, resume: bool, log: logging.Logger, is_main: bool = True) -> int:
    """Load the initial weights of a new run (and report them); returns the epochs the encoder stays frozen.

    A resumed run loads nothing here and keeps the freeze recorded when it started; one killed before
    its first checkpoint starts again from the weights it started from.
    """
    report_path = Path(folder) / REPORT_NAME
    saved = json.loads(report_path.read_text()) if resume and report_path.is_file() else None
    if resume and (Path(folder) / "last.pt").is_file():
        if init_weights is not None:
            log.info(f"--init-weights not re-applied: the run continues from {Path(folder) / 'last.pt'}")
        return saved["freeze_encoder_epochs"] if saved else 0
    if saved:
        init_weights, freeze_epochs = Path(saved["source"]), saved["freeze_encoder_epochs"]
    if init_weights is None:
        return 0
    weights, path = read_weights(init_weights)
    report = load_matching(network, weights)
    if not report["loaded"]:
        raise InputError(f"{path}: no tensor matches the {family} network by name and shape "
                         f"(trained with another network or width?)")
    fresh = report["missing"] + list(report["shape_mismatch"])
    report = {"source": str(Path(init_weights).resolve()), "checkpoint": str(path.resolve()), **report,
              "freeze_encoder_epochs": freeze_epochs,
              "encoder": encoder_names(network, family) if freeze_epochs else []}
    if is_main:
        write_text(json.dumps(report, indent=2), report_path)
    shown = list(report["shape_mismatch"].items())[:3]  # the log names a few; init_weights.json has them all
    mismatched = ", ".join(f"{k} {tuple(v['source'])} -> {tuple(v['network'])}" for k, v in shown)
    extra = len(report["shape_mismatch"]) - len(shown)
    mismatched += f", ... ({extra} more)" if extra else ""
    mismatched = f": {mismatched}" if mismatched else ""
    log.info(f"initial weights from {path}: {len(report['loaded'])} of {len(network.state_dict())} tensors loaded, "
             f"{len(fresh)} left fresh ({len(report['shape_mismatch'])} shape mismatch{mismatched}; "
             f"{len(report['missing'])} missing in the source); details in {report_path}")
    if freeze_epochs:
        log.info(f"encoder ({len(report['encoder'])} parameters) frozen for the first {freeze_epochs} epoch(s)")
    return freeze_epochs


def freeze_for_epoch(network: torch.nn.Module, family: str, epoch: int, freeze_epochs: int,
                     log: logging.Logger) -> None:
    """Before epoch `epoch` (0-based): the encoder frozen while `epoch < freeze_epochs`, trainable from then on."""
    if not freeze_epochs:
        return
    set_encoder_frozen(network, family, epoch < freeze_epochs)
    if epoch == freeze_epochs:
        log.info(f"encoder unfrozen from epoch {epoch + 1}")
