"""Resumable runs for the long reproduction scripts (bench/akrout_mnist.py, bench/biotorch_mnist.py):
a checkpoint is written atomically and resumes only the run it was written by."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def load_run(path: Path | None, run: dict) -> dict | None:
    """The checkpoint at ``path`` if there is one (None otherwise); ``SystemExit`` if it was
    written by another run (``run`` names what must match: method, seed, lr, data, ...)."""
    if path is None or not path.exists():
        return None
    state = torch.load(path, weights_only=False)
    if state.get("run") != run:
        raise SystemExit(f"error: {path} is a checkpoint of another run ({state.get('run')}, this one is {run}): "
                         "delete it or pass another --state-dir")
    return state


def save_run(path: Path, run: dict, **state) -> None:
    """Write ``state`` and ``run`` to ``path`` atomically (an interrupted write leaves the old file)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save({**state, "run": run}, tmp)
    os.replace(tmp, path)
