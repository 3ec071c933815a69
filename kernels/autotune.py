"""Choosing by measurement, and remembering the choice: the tuner behind the kernels' launch
configs (:func:`select_config`) and behind ``backend="auto"`` (Triton or the PyTorch reference,
per step of the layer; ``fa_triton.backend``).

A choice for a key is looked up, in order: in this process's memory; for kernel configs, in the
sweep's table for this GPU (``tuned_tables.py``); in the on-disk cache; else every candidate is
run once (compiling it) and then timed on the device with ``triton.testing.do_bench``, the
fastest kept and written to memory and disk. A candidate that fails (out of shared memory, a
TMA kernel this GPU cannot run) is skipped.

The disk cache is one JSON file per GPU name, torch, triton and fa_triton version and hash of
the kernels' sources (a choice is only valid for the code it was measured with), in
``$FA_TRITON_CACHE_DIR`` or else ``$XDG_CACHE_HOME/fa_triton`` (``~/.cache/fa_triton``);
``FA_TRITON_CACHE_DIR=0`` (or ``off``) keeps choices in memory only. So a new process does not
tune again, and the choices, hence the results, stay the same from run to run on one machine.
``FA_TRITON_AUTOTUNE=0`` turns tuning off: heuristic configs and Triton for ``"auto"``.

Tuning cannot run inside CUDA-graph capture: there a cached choice is used, else a stand-in
(the heuristic config, or Triton) that is not remembered, so warm up (run one step) before
capturing a graph. :func:`tuning_report` lists every choice and the timings behind it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch

from . import tuned_tables, tuning
from .tuning import LaunchConfig, Problem


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in ("0", "false", "no", "off", "")


# FA_TRITON_AUTOTUNE=0 keeps the heuristic configs (no tuning runs, same choice in every process).
AUTOTUNE = _env_flag("FA_TRITON_AUTOTUNE", True)
CACHE_ENV = "FA_TRITON_CACHE_DIR"
# Below this many multiply-adds a kernel is launch-bound: tuning its config could not pay for itself.
TUNE_MIN_MACS = 1 << 20
TUNE_WARMUP_MS = 5
TUNE_REP_MS = 20

_log = logging.getLogger("fa_triton.autotune")


def benchmark_ms(fn) -> float:
    """Median GPU milliseconds of ``fn()`` by ``triton.testing.do_bench``."""
    from triton.testing import do_bench

    ms = do_bench(fn, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, quantiles=[0.5])
    # Some Triton versions return a bare float for a single quantile, others a list.
    return float(ms[0] if isinstance(ms, (list, tuple)) else ms)


def tracing() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# ------------------------------------------------------------------------------ the disk cache

_KERNELS_HASH = None


def kernels_hash() -> str:
    """A hash of this package's sources: a choice is valid only for the kernels, candidates and
    configs it was measured with, whatever the version number says."""
    global _KERNELS_HASH
    if _KERNELS_HASH is None:
        digest = hashlib.sha1()
        for path in sorted(Path(__file__).parent.glob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        _KERNELS_HASH = digest.hexdigest()[:12]
    return _KERNELS_HASH


def versions() -> dict[str, str]:
    """The versions a cached choice is valid for (besides the GPU's name): torch, triton,
    fa_triton, and the hash of the kernels' sources."""
    import triton

    module = sys.modules.get("fa_triton")
    fa_version = getattr(module, "__version__", None)
    if fa_version is None:
        try:
            from importlib.metadata import version

            fa_version = version("fa_triton")
        except Exception:  # noqa: BLE001 - not installed: the source tree's version is unknown
            fa_version = "unknown"
    return {"torch": torch.__version__, "triton": triton.__version__, "fa_triton": fa_version,
            "kernels": kernels_hash()}


def cache_dir() -> Path | None:
    """The on-disk cache's folder, or None when ``FA_TRITON_CACHE_DIR`` turns it off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        if value.strip().lower() in ("", "0", "off", "false", "no", "none"):
            return None
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fa_triton"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def _suffix(v: dict) -> str:
    """The cache file name after the GPU's: every version it depends on."""
    return (f"_torch-{v['torch']}_triton-{v['triton']}_fa_triton-{v['fa_triton']}"
            + (f"_kernels-{v['kernels']}" if v.get("kernels") else "") + ".json")


def _read_entries(path: Path) -> dict:
    """The entries of a cache file ({} if it does not exist); ValueError if it is not one."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise ValueError("no 'entries' object")
    return entries


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path``'s lock file while the file is read, changed and replaced
    (processes tuning at once, e.g. DDP ranks, then keep each other's entries); no lock where
    the platform has none."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux
        yield
        return
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _encode(candidate) -> dict:
    if isinstance(candidate, LaunchConfig):
        return {"config": dataclasses.asdict(candidate)}
    return {"name": candidate}


def _decode(value: dict):
    return LaunchConfig(**value["config"]) if "config" in value else value["name"]


def _describe(candidate) -> str:
    if isinstance(candidate, LaunchConfig):
        c = candidate
        return (f"{c.block_rows}x{c.block_cols}x{c.block_red} w{c.num_warps} s{c.num_stages}"
                + (f" split{c.split}" if c.split > 1 else "") + (" tma" if c.tma else ""))
    return str(candidate)


class Entry(NamedTuple):
    """One choice: for ``key`` on ``gpu``, ``choice`` (a LaunchConfig, or a backend name) with
    the timings behind it ([(candidate, ms or "failed: ...")]) and where it came from
    ("measured", "disk", "table" or "stand-in")."""

    gpu: str
    key: tuple
    choice: object
    timings: tuple
    source: str


class Tuner:
    """Chooses among candidates by timing them, remembering choices in memory and on disk.

    ``timer(fn) -> ms`` (default :func:`benchmark_ms`), ``directory`` (default :func:`cache_dir`,
    None: memory only) and ``versions`` (default :func:`versions`) can be given, so that tests
    drive it without a GPU.
    """

    def __init__(self, timer: Callable | None = None, directory: Path | None | str = "default",
                 versions_of: Callable[[], dict] | None = None):
        self.timer = timer or benchmark_ms
        self._directory = directory
        self._versions = versions_of or versions
        self.entries: dict[tuple, Entry] = {}
        self._files: dict[str, dict] = {}  # gpu -> that GPU's file, as loaded

    def _path(self, gpu: str) -> Path | None:
        directory = cache_dir() if self._directory == "default" else self._directory
        if directory is None:
            return None
        return Path(directory) / f"{_slug(gpu)}{_suffix(self._versions())}"

    def _disk(self, gpu: str) -> dict:
        if gpu not in self._files:
            path, entries = self._path(gpu), {}
            if path is not None:
                try:
                    entries = _read_entries(path)
                except (OSError, ValueError) as err:
                    _log.warning("fa_triton: ignoring the unreadable tuning cache %s (%s)", path, err)
            self._files[gpu] = entries
        return self._files[gpu]

    def _write(self, gpu: str, key_text: str, record: dict) -> None:
        path = self._path(gpu)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _locked(path):
                try:
                    entries = _read_entries(path)  # merged with what other processes wrote meanwhile
                except ValueError:
                    entries = {}  # a broken file is replaced, not kept broken
                entries[key_text] = record
                data = {"gpu": gpu, "versions": self._versions(), "entries": entries}
                with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(f.name, path)
        except OSError as err:
            _log.warning("fa_triton: could not write the tuning cache %s (%s); choices stay in memory", path, err)

    def lookup(self, gpu: str, key: tuple):
        """The remembered choice for ``key`` (memory, then disk), or None."""
        entry = self.entries.get((gpu, key))
        if entry is not None:
            return entry.choice
        record = self._disk(gpu).get(json.dumps(list(key)))
        if record is None:
            return None
        try:
            choice = _decode(record["choice"])
            timings = tuple((_decode(c), ms) for c, ms in record.get("timings", ()))
        except (TypeError, ValueError, KeyError, AttributeError) as err:
            # Written by another version of the configs (a field it had, a value it allowed): a miss.
            _log.warning("fa_triton: ignoring the tuning cache's entry for %s (%s)", key, err)
            return None
        self.entries[(gpu, key)] = Entry(gpu, key, choice, timings, "disk")
        return choice

    def remember(self, gpu: str, key: tuple, choice, timings=(), source: str = "measured") -> None:
        self.entries[(gpu, key)] = Entry(gpu, key, choice, tuple(timings), source)
        if source == "measured":
            record = {"choice": _encode(choice), "timings": [[_encode(c), ms] for c, ms in timings]}
            self._disk(gpu)[json.dumps(list(key))] = record
            self._write(gpu, json.dumps(list(key)), record)

    def choose(self, gpu: str, key: tuple, candidates: Sequence, run: Callable, *, stand_in=None):
        """(choice, final): the remembered choice for ``key``, else the candidate whose ``run(c)``
        times fastest. During CUDA-graph capture nothing can be timed: ``stand_in`` (default the
        first candidate) is returned with final=False and not remembered."""
        choice = self.lookup(gpu, key)
        if choice is not None:
            return choice, True
        if capturing():
            return (candidates[0] if stand_in is None else stand_in), False
        timings, best, best_ms, first_error = [], None, math.inf, None
        for candidate in candidates:
            try:
                run(candidate)  # compiles it, outside what is timed
                ms = self.timer(lambda candidate=candidate: run(candidate))
            except Exception as err:  # noqa: BLE001 - any failure just disqualifies this candidate
                first_error = first_error or err
                timings.append((candidate, f"failed: {type(err).__name__}"))
                continue
            timings.append((candidate, ms))
            if ms < best_ms:
                best, best_ms = candidate, ms
        if best is None:
            raise RuntimeError(f"fa_triton autotuning: none of {len(candidates)} candidates ran; first error: "
                               f"{first_error}") from first_error
        _log.debug("autotune %s: best %s (%.4f ms) of %s", key, best, best_ms, timings)
        self.remember(gpu, key, best, timings)
        return best, True

    def load_cached(self) -> int:
        """Load every choice cached on disk for this process's versions (any GPU); the count."""
        directory = cache_dir() if self._directory == "default" else self._directory
        if directory is None or not Path(directory).is_dir():
            return 0
        loaded = 0
        for path in sorted(Path(directory).glob("*" + _suffix(self._versions()))):
            try:
                data = json.loads(path.read_text())
                entries, gpu = _read_entries(path), data["gpu"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                _log.warning("fa_triton: ignoring the unreadable tuning cache %s (%s)", path, err)
                continue
            for key_text in entries:
                loaded += self.lookup(gpu, tuple(json.loads(key_text))) is not None
        return loaded

    def report(self) -> str:
        """Every choice made or loaded in this process: key, choice, source, and the timings."""
        if not self.entries:
            return "fa_triton tuning: no choice made or loaded in this process"
        lines = []
        for entry in sorted(self.entries.values(), key=lambda e: (e.gpu, [str(k) for k in e.key])):
            lines.append(f"{entry.gpu} | {' '.join(map(str, entry.key))} -> {_describe(entry.choice)} ({entry.source})")
            for candidate, ms in entry.timings:
                shown = f"{ms:.4f} ms" if isinstance(ms, float) else ms
                lines.append(f"    {_describe(candidate):<32} {shown}")
        return "\n".join(lines)


TUNER = Tuner()
# The sweep's table (tuned_tables.py holds plain dicts: it must not import this module).
TABLE: dict[tuple, LaunchConfig] = {key: LaunchConfig(**fields) for key, fields in tuned_tables.TABLE.items()}


def tuning_report(cached: bool = False) -> str:
    """What was chosen in this process, and why: each key's choice and its candidates' times;
    with ``cached``, also every choice in the on-disk cache for these versions."""
    if cached:
        TUNER.load_cached()
    return TUNER.report()


def select_config(problem: Problem, device: torch.device, launch) -> tuple[LaunchConfig, bool]:
    """(config, final) for ``problem`` on ``device``; ``final`` is False when the config is a
    stand-in that a later call should replace (chosen during CUDA-graph capture, before tuning
    could run). ``launch(config)`` runs the kernel with that config (for timing).

    The heuristic config (no timing) under the interpreter, off CUDA, for launch-bound sizes,
    with ``FA_TRITON_AUTOTUNE=0`` or while tracing; else the table's, the cached or the tuned one.
    """
    p = problem
    sms = tuning.sm_count(device)
    interpreted = device.type != "cuda"
    heuristic = tuning.heuristic_config(p.kernel, p.rows, p.cols, p.red, p.dtype, sms, interpreted)
    if interpreted or not AUTOTUNE or p.rows * p.cols * p.red < TUNE_MIN_MACS or tracing():
        return heuristic, True
    tma = tuning.tma_allowed(device, p)
    key = tuning.problem_key(p, tma)
    gpu = tuning.device_name(device)
    config = TABLE.get((gpu,) + key)
    if config is not None:
        TUNER.remember(gpu, key, config, source="table")
        return config, True
    candidates = tuning.candidate_configs(p.kernel, p.rows, p.cols, p.red, p.dtype, sms, tma)
    return TUNER.choose(gpu, key, candidates, launch, stand_in=heuristic)
