"""bench/gpu_check.sh without a GPU: its dry-run mode runs every step on the CPU at a tiny size;
and bench/choices.py, which prints the tuning choices at its end."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import choices
from bench.results import COLUMNS, read_rows

SCRIPT = Path(__file__).resolve().parent / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_check_dry_run(tmp_path):
    results = tmp_path / "results"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_RESULTS": str(results),
           # CI's time: one test file for step (a), one dtype's tiny target for the sweep.
           "GPU_CHECK_TEST_PATHS": "bench/test_run.py", "GPU_CHECK_SWEEP_ARGS": "--dtypes fp16",
           "GPU_CHECK_BENCH_ARGS": "--preset smoke --families square --providers reference,fa_triton_auto,fa_triton "
                                   "--dtypes fp32 --modes forward_backward --no-peaks"}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = done.stdout
    sections = ["=== GPU", "=== (a) CUDA tests", "=== (b) each kernel beside cuBLAS and the tutorial GEMM",
                "=== (c) the layer: auto and Triton-only vs the reference", "=== (d) memory",
                "=== (e) torch.compile(fullgraph=True) against eager", "=== (f) the network",
                "=== tuning choices", "=== summary"]
    assert [text.index(s) for s in sections] == sorted(text.index(s) for s in sections)  # in this order
    assert ("tests: exit 0 | kernels: exit 0 | layer: exit 0 | memory: exit 0 | compile: exit 0 | "
            "network: exit 0") in text
    assert "compiled / eager = " in text
    assert "one pass / one seed's step: " in text  # the ensemble ran (its smoke size)
    assert "skipped" in text  # the cuda tests ran (and skipped without a GPU)
    # Every output under GPU_CHECK_RESULTS, named by the device; the tuning cache is printed.
    name = next(p.name for p in results.glob("gpu_check-*.log")).removeprefix("gpu_check-").removesuffix(".log")
    assert f"FA_TRITON_CACHE_DIR={results}/tuning-{name}" in text
    for output in (f"{name}.csv", f"sweep-{name}.csv", f"memory-{name}.txt", f"compile-{name}.txt",
                   f"{name}_square.png"):
        assert (results / output).exists(), output
    sweep_rows = (results / f"sweep-{name}.csv").read_text().splitlines()
    assert len(sweep_rows) == 1 + 4  # header + the four jobs of the fp16 target
    assert "=== summary" in (results / f"gpu_check-{name}.log").read_text()
    # The report: targets (none claimed from a CPU), each kernel, then the layer table last.
    assert "targets (no GPU rows: every target unmeasured)" in text and "per kernel (CPU (interpreter)" in text
    lines = text.rstrip().splitlines()
    assert [c.strip() for c in lines[-3].split(" | ")] == ["shape", "dtype", "mode", "auto ms", "triton ms",
                                                          "reference ms", "auto x ref", "triton x ref", "% of peak"]
    assert lines[-1].startswith("32x32 -> 32 (relu) [interpreter] | fp32  | fwd+bwd")
    rows = read_rows(results / f"{name}.csv")
    assert rows and list(rows[0]) == list(COLUMNS)
    assert {r["provider"] for r in rows if r["metric"] == "time"} == {"reference", "fa_triton_auto",
                                                                      "fa_triton_interpreter"}


def test_choices_prints_every_cached_choice(tmp_path, capsys, monkeypatch):
    from fa_triton.kernels import autotune, tuning

    cache = tmp_path / "cache"
    monkeypatch.setenv("FA_TRITON_CACHE_DIR", str(tmp_path / "elsewhere"))  # choices.main points it at cache
    monkeypatch.setattr(autotune, "TUNER", autotune.Tuner())  # the process's tuner, fresh
    times = iter([2.0, 1.0, 3.0, 0.5])
    tuner = autotune.Tuner(timer=lambda fn: next(times), directory=cache)
    fast, slow = tuning.LaunchConfig(64, 64, 32), tuning.LaunchConfig(128, 128, 32, 8)
    tuner.choose("Test GPU", ("forward", "bfloat16", "tf32", "relu", False, False, 64, 64, 64), [slow, fast],
                 lambda candidate: None)
    tuner.choose("Test GPU", ("auto", "forward", "bfloat16", 64), ["triton", "torch"], lambda name: None)
    out = tmp_path / "tuning.txt"
    assert choices.main(["--cache-dir", str(cache), "--output", str(out), "--brief"]) == 0
    printed = capsys.readouterr().out
    assert "forward bfloat16 tf32 relu False False 64 64 64 -> 64x64x32 w4 s3 (disk)" in printed
    assert "auto forward bfloat16 64 -> torch (disk)" in printed
    assert "ms" not in printed.split(":", 1)[1]  # --brief: the choices, not the candidates' times
    assert "64x64x32 w4 s3" in out.read_text() and "1.0000 ms" in out.read_text()
    assert choices.main(["--cache-dir", str(tmp_path / "none")]) == 0
    assert "no cache folder" in capsys.readouterr().out
