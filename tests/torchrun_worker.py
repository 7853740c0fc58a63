"""Test harness, one rank of a torchrun job: `torchrun ... torchrun_worker.py RECORD_DIR MEDSEG_ARGS...`.

Runs the real `medseg` CLI with MEDSEG_ARGS and records in RECORD_DIR/rank<RANK>.json what this rank
did: every file it wrote (opened for writing, or renamed into place as atomic writes do), seen through
Python's audit hooks, and a digest of the weights of the network `medseg train` built in it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names and exact values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def record_writes(written: set[str]):
    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode, flags = args
            if any(c in mode for c in "wax+") if isinstance(mode, str) else flags & (os.O_WRONLY | os.O_RDWR):
                written.add(os.path.abspath(os.fsdecode(path)))
        elif event == "os.rename":
            written.add(os.path.abspath(os.fsdecode(args[1])))

    return hook


def main() -> int:
    import medseg.train.run
    from medseg.cli import main as medseg_main

    record_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    written: set[str] = set()
    networks = []
    build_network = medseg.train.run.build_network

    def keep_network(plan):
        networks.append(build_network(plan))
        return networks[-1]

    medseg.train.run.build_network = keep_network
    sys.addaudithook(record_writes(written))
    code = medseg_main(argv)
    record = {"exit": code, "written": sorted(written),
              "weights": weights_digest(networks[-1].state_dict()) if networks else None}
    (record_dir / f"rank{os.environ['RANK']}.json").write_text(json.dumps(record))
    return code


if __name__ == "__main__":
    sys.exit(main())
