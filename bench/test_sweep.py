"""bench/sweep.py without a GPU: the dry run (interpreter, tiny shapes) of both modes, its CSV,
and the table it emits for kernels/tuned_tables.py."""

import ast
import csv
import importlib.util

import pytest
import torch

from bench import sweep
from fa_triton.kernels import autotune, tuning


@pytest.fixture(scope="module")
def dry_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "sweep.csv"
    assert sweep.main(["--dry-run", "--workers", "0", "--output", str(path)]) == 0
    assert sweep.main(["--dry-run", "--mode", "chosen", "--same-tile", "--workers", "0", "--output", str(path)]) == 0
    with path.open() as f:
        return path, list(csv.DictReader(f))


def test_dry_run_times_every_job_and_candidate(dry_csv):
    _, rows = dry_csv
    assert rows and list(rows[0]) == list(sweep.COLUMNS)
    for target in sweep.targets(dry_run=True):
        jobs = {r["job"] for r in rows if int(r["M"]) == target.M and r["dtype"] == target.dtype}
        assert jobs == set(sweep.JOBS), target
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows if r["status"] != "ok"]
    assert all(float(r["err"]) <= sweep.TOLERANCE[r["dtype"]] for r in rows)
    assert all(float(r["baseline_ms"]) > 0 and float(r["ms"]) > 0 and float(r["x_baseline"]) > 0 for r in rows)
    gemm = [r for r in rows if r["job"] in sweep.GEMM_JOBS]
    # Every GEMM beside torch.mm (cuBLAS on a GPU) and the tutorial GEMM of the same layout, in the same run.
    assert all(r["baseline"] == "torch.mm" and float(r["tutorial_ms"]) > 0 and r["tutorial_config"] for r in gemm)
    assert {(r["job"], r["layout"]) for r in gemm} == {("forward", "NT"), ("backward_input", "NN"),
                                                        ("backward_weight", "TN")}
    # The δ pass: a memory pass beside the unfused torch ops, with its bandwidth.
    passes = [r for r in rows if r["job"] == "local_error"]
    assert passes and all(r["baseline"] == "torch_unfused" and float(r["gbps"]) > 0 and not r["tutorial_ms"]
                          for r in passes)
    assert {r["tma"] for r in gemm if r["chosen"] == "False"} == {"True", "False"}  # aligned shapes get TMA
    assert any(int(r["split"]) > 1 for r in rows if r["job"] in ("forward", "backward_weight", "local_error"))
    chosen = [r for r in rows if r["chosen"] == "True"]
    assert len(chosen) == len(sweep.JOBS) * len(sweep.targets(dry_run=True))
    assert all(r["config"] for r in chosen)  # the config the launcher picked is reported
    # --same-tile: the tutorial GEMM also ran with the chosen config's tile.
    assert all(float(r["tutorial_same_ms"]) > 0 for r in chosen if r["job"] in sweep.GEMM_JOBS)


def test_tutorial_tiles_follow_the_layout():
    case = sweep.Case(sweep.Target("square", 512, 512, 512, "relu", "fp16"), "cpu")
    assert case.tutorial_tile("forward") == (256, 128, 64, 8, 3)  # NT
    assert case.tutorial_tile("backward_input") == case.tutorial_tile("backward_weight") == (128, 256, 64, 8, 3)
    small = sweep.Case(sweep.Target("tutorial", 64, 64, 10, "identity", "fp32"), "cpu")
    assert small.tutorial_tile("backward_weight") == (16, 64, 32, 8, 3)  # fp32's tile, clamped to 10 x 64, red 64


def test_gpu_check_preset_puts_16_bit_squares_first():
    found = sweep.targets(preset="gpu-check")
    assert [(t.dtype, t.M) for t in found[:4]] == [("bf16", 8192), ("bf16", 4096), ("fp16", 8192), ("fp16", 4096)]
    assert {t.dtype for t in found} == {"bf16", "fp16", "tf32", "fp32"}
    assert {(t.K, t.N, t.M) for t in found if t.name == "tutorial"} == {
        (K, N, M) for K, N, _ in sweep.TUTORIAL_LAYERS for M in (64, 8192)}


def test_emitted_table_is_what_select_config_reads(dry_csv, tmp_path, monkeypatch):
    path, rows = dry_csv
    table_path = tmp_path / "tuned_tables.py"
    assert sweep.main(["--emit-table", str(path), "--table-path", str(table_path)]) == 0
    spec = importlib.util.spec_from_file_location("emitted", table_path)
    emitted = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emitted)
    candidates = [r for r in rows if r["chosen"] == "False" and r["key"]]
    assert not any(r["key"] for r in rows if r["job"] == "local_error")  # the δ pass has no table
    assert len(emitted.TABLE) == len({(r["gpu"], r["key"]) for r in candidates})
    for key, fields in emitted.TABLE.items():
        fastest = min((r for r in candidates if (r["gpu"],) + ast.literal_eval(r["key"]) == key),
                      key=lambda r: float(r["ms"]))
        assert tuning.LaunchConfig(**fields) == tuning.LaunchConfig(
            int(fastest["block_rows"]), int(fastest["block_cols"]), int(fastest["block_red"]),
            int(fastest["num_warps"]), int(fastest["num_stages"]), int(fastest["group"]), int(fastest["split"]),
            fastest["tma"] == "True")
    # The key format is the tuner's: a GPU with this name would use the entry without tuning.
    key, fields = next(iter(emitted.TABLE.items()))
    gpu, kernel, dtype, precision, tag, store, tma, rows_, cols, red = key
    batch_axis = "red" if kernel == "backward_weight" else "rows"
    problem = tuning.Problem(kernel, rows_, cols, red, batch_axis, getattr(torch, dtype), precision, tag, store, tma)
    monkeypatch.setattr(autotune, "TABLE", {key: tuning.LaunchConfig(**fields)})
    monkeypatch.setattr(autotune, "AUTOTUNE", True)
    monkeypatch.setattr(autotune, "TUNE_MIN_MACS", 1)
    monkeypatch.setattr(autotune, "TUNER", autotune.Tuner(timer=lambda fn: pytest.fail("timed"), directory=None))
    monkeypatch.setattr(tuning, "sm_count", lambda device: 132)
    monkeypatch.setattr(tuning, "device_name", lambda device: gpu)
    monkeypatch.setattr(tuning, "tma_supported", lambda device: tma)
    config, final = autotune.select_config(problem, torch.device("cuda", 0),
                                           lambda config: pytest.fail("tuned a key the table has"))
    assert final and config == tuning.LaunchConfig(**fields)


def test_warm_compile_compiles_without_running(monkeypatch):
    # The pool in-process (threads, not spawned processes: CI's time), the kernels' runs restored after.
    from concurrent.futures import ThreadPoolExecutor

    from fa_triton.kernels import tutorial_gemm
    from fa_triton.kernels.launchers import JIT_KERNELS

    kernels = (*JIT_KERNELS.values(), tutorial_gemm.tutorial_matmul_kernel)
    for kernel in kernels:
        monkeypatch.setattr(kernel, "run", kernel.run)  # undone after the test: _warm_init replaces them
    warmups = []
    for kernel in kernels:
        run = kernel.run
        monkeypatch.setattr(kernel, "run", lambda *a, grid, warmup, _run=run, **kw: warmups.append(warmup))
    monkeypatch.setattr(sweep, "ProcessPoolExecutor",
                        lambda workers, mp_context, initializer: ThreadPoolExecutor(1, initializer=initializer))
    small = sweep.Target("square", 32, 32, 32, "relu", "fp32")
    other = sweep.Target("square", 48, 48, 48, "relu", "fp32")
    config = tuning.LaunchConfig(16, 16, 16)
    items = [(small, "forward", "fa", config), (other, "forward", "fa", config),
             (small, "backward_input", "tutorial", (16, 16, 16, 4, 1))]
    assert sweep.warm_compile(items, "cpu", workers=2) == 3
    assert warmups and all(warmups)  # compiled (warmup=True), never run
    assert sweep.warm_compile(items, "cpu", workers=0) == 0
