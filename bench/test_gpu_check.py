"""bench/gpu_check.sh without a GPU: its dry-run mode runs every step on the CPU at a tiny size."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.results import COLUMNS, read_rows

SCRIPT = Path(__file__).resolve().parent / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "dry.csv"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_OUTPUT": str(out),
           "GPU_CHECK_SWEEP_OUTPUT": str(tmp_path / "sweep.csv"),
           "GPU_CHECK_BENCH_ARGS": "--preset smoke --families square --providers reference,fa_triton "
                                   "--dtypes fp32 --modes forward_backward --no-peaks"}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = done.stdout
    for section in ("=== GPU", "=== CUDA tests", "=== per-kernel GPU time beside cuBLAS", "=== memory",
                    "=== benchmarks", "=== summary"):
        assert section in text
    assert "kernels: exit 0 | memory: exit 0" in text
    assert (tmp_path / "sweep.csv").read_text().count("\n") > 5  # a row per kernel and target
    assert "skipped" in text  # the cuda tests ran (and skipped without a GPU)
    lines = text.rstrip().splitlines()
    # The output ends with the table: header, rule, one row per case timed with both providers.
    assert [c.strip() for c in lines[-3].split(" | ")] == ["shape", "dtype", "mode", "fa_triton ms", "reference ms",
                                                          "ratio", "% of peak"]
    assert lines[-1].startswith("32x32 -> 32 (relu) [interpreter] | fp32  | fwd+bwd")
    rows = read_rows(out)
    assert rows and list(rows[0]) == list(COLUMNS)
