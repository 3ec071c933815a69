"""Files an experiment writes, written so that an interruption never corrupts them: checkpoints
that resume only the run they belong to, and result CSVs that several runs can share."""

from __future__ import annotations

import contextlib
import csv
import os
from pathlib import Path
from typing import Callable

import torch


def load_run(path: Path | None, run: dict, compare: Callable[[dict, dict], str | None] | None = None) -> dict | None:
    """The checkpoint at ``path`` if there is one (None otherwise).

    ``run`` names what must match (method, seed, learning rate, data, ...): ``compare(recorded,
    run)`` returns why a checkpoint does not belong to this run, or None (default: any
    difference). A checkpoint of another run is a ValueError naming the file and the reason.
    """
    if path is None or not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"{path} is not a readable checkpoint ({' '.join(str(err).split())}): delete it") from None
    recorded = state.get("run") if isinstance(state, dict) else None
    if not isinstance(recorded, dict):
        raise ValueError(f"{path} is not a checkpoint of a run: delete it or choose another folder")
    if compare is None:
        reason = None if recorded == run else f"it was written by {recorded}, this run is {run}"
    else:
        reason = compare(recorded, run)
    if reason:
        raise ValueError(f"{path} is a checkpoint of another run ({reason}): choose another folder, or start "
                         "again over it (--overwrite)")
    return state


def save_run(path: Path, run: dict, **state) -> None:
    """Write ``state`` and ``run`` to ``path`` atomically (an interrupted write leaves the old file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save({**state, "run": run}, tmp)
    os.replace(tmp, path)


def replace_rows(path: Path, columns: tuple[str, ...], rows: list[dict], key: tuple[str, ...]) -> None:
    """Rewrite a results CSV with ``rows`` in place of the old rows that share their ``key``
    columns (the others are kept); atomic, so an interrupted run leaves the old file whole, and
    serialized by a lock file, so runs of different methods can share one CSV."""
    new_keys = {tuple(str(row[k]) for k in key) for row in rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.with_name(path.name + ".lock")):
        kept = []
        if path.exists():
            with path.open(newline="") as f:
                kept = [r for r in csv.DictReader(f) if tuple(r[k] for k in key) not in new_keys]
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(kept + rows)
        os.replace(tmp, path)


@contextlib.contextmanager
def locked(lock_path: Path):
    """An exclusive lock on ``lock_path`` (POSIX flock; without fcntl, no lock)."""
    try:
        import fcntl
    except ImportError:  # Windows: one writer at a time is the caller's job
        yield
        return
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
