"""Long-format benchmark results: one CSV row per (case, provider, metric), and the run's environment.

Columns (exactly, in this order)::

    kernel, provider, mode, dtype, M, N, K, metric, unit, p50, p20, p80,
    device_name, torch, triton, commit, timestamp

``p20``/``p80`` are the 20th/80th percentiles of the same measurement (for a rate they are
computed from the 80th/20th percentile times, so p20 <= p50 <= p80 always holds). A case that
could not run has ``metric="failed"``, the reason in ``unit`` and empty numbers.
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import platform
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

COLUMNS = (
    "kernel", "provider", "mode", "dtype", "M", "N", "K", "metric", "unit", "p50", "p20", "p80",
    "device_name", "torch", "triton", "commit", "timestamp",
)
REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: torch.device | str) -> str:
    """A human name for the device the numbers come from, e.g. "NVIDIA H100 80GB HBM3" or
    "CPU: AMD EPYC 7B13 (2 threads)"."""
    import torch  # here, not at the top: bench.report reads CSVs without importing torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU: {cpu_name()} ({threads} thread{'s' if threads != 1 else ''})"


def slug(text: str) -> str:
    """A file-name-safe form of a device name."""
    text = re.sub(r"\(.*?\)", "", text)
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "device"


def git_commit() -> str:
    """The short commit of the working tree ("+dirty" if it has changes), or "unknown"."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def environment(device: torch.device | str) -> dict:
    """The per-run columns: device_name, torch, triton, commit, timestamp (UTC, ISO 8601)."""
    import torch

    return {
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "commit": git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def default_csv_path(device: torch.device | str) -> Path:
    return RESULTS_DIR / f"{slug(device_name(device))}.csv"


def _number(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.6g}"


def make_row(env: dict, *, kernel: str, provider: str, mode: str, dtype: str, M: int, N: int, K: int,
             metric: str, unit: str, p50=None, p20=None, p80=None) -> dict:
    row = dict(kernel=kernel, provider=provider, mode=mode, dtype=dtype, M=M, N=N, K=K, metric=metric,
               unit=unit, p50=_number(p50), p20=_number(p20), p80=_number(p80))
    row.update({key: env[key] for key in ("device_name", "torch", "triton", "commit", "timestamp")})
    return row


def append_rows(path: Path | str, rows: list[dict]) -> Path:
    """Append rows to the CSV at `path` (header written when the file is new)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), None)
        if tuple(header or ()) != COLUMNS:
            raise ValueError(f"{path} has columns {header}, expected {list(COLUMNS)}: write to a new file")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({key: row[key] for key in COLUMNS})
    return path


def read_rows(path: Path | str) -> list[dict]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def latest_run(rows: list[dict]) -> list[dict]:
    """For each (kernel, provider, mode, dtype, M, N, K, metric, device), its newest row."""
    newest: dict[tuple, dict] = {}
    for row in rows:
        key = tuple(row[c] for c in ("kernel", "provider", "mode", "dtype", "M", "N", "K", "metric", "device_name"))
        if key not in newest or row["timestamp"] >= newest[key]["timestamp"]:
            newest[key] = row
    return list(newest.values())
