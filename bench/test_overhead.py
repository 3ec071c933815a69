"""The host-cost, memory, methods and conv benchmarks on the CPU: what they measure, not how fast."""

import pytest
import torch

from bench import launch_overhead, memory
from fa_triton.kernels.launchers import JIT_KERNELS


def _runs() -> dict:
    return {name: kernel.run for name, kernel in JIT_KERNELS.items()}


def test_launch_overhead_measures_each_launcher_and_restores_the_kernels():
    runs = _runs()
    rows = launch_overhead.measure("cpu", calls=20, repeats=2)
    assert {name for name, _, _ in rows} == set(launch_overhead.LAUNCHERS) == {
        "fa_linear_forward", "fa_linear_local_error", "fa_linear_backward_input", "fa_linear_backward_weight"}
    assert {shape for _, shape, _ in rows} == set(launch_overhead.SHAPES)
    assert all(us > 0 for _, _, us in rows)
    assert _runs() == runs


def test_memory_counts_what_the_layer_saves():
    # One [M, N] tensor per layer besides the caller's x, W and B: y for relu, f'(z) for gelu.
    for M, K, N, activation, dtype in memory.DRY_SHAPES:
        results = {b: memory.measure(M, K, N, activation, dtype, "cpu", b) for b in ("torch", "triton")}
        itemsize = 4 if dtype == "fp32" else 2
        expected = M * N * itemsize
        assert results["torch"]["saved_bytes"] == results["triton"]["saved_bytes"] == expected
        assert results["triton"]["peak_bytes"] is None  # CUDA only


def test_eager_overhead_times_both_providers_and_restores_the_kernels():
    from bench import eager_overhead
    from fa_triton.kernels import autotune

    runs, tuner = _runs(), autotune.TUNER
    results = eager_overhead.measure(steps=20, repeats=2)
    assert set(results) == {"triton (launches stubbed)", "torch", "nn.Linear + ReLU", "minimal Function",
                            "module + minimal Function", "module + bare Triton Function (launches stubbed)",
                            "auto, kernels chosen (launches stubbed)"}
    assert all(us > 0 for us in results.values())
    assert _runs() == runs
    # auto's stand-ins are gone: the resolution cache, the tuner and auto's choices are the process's own again
    from fa_triton.kernels import autotune
    from fa_triton.ops import backends

    assert backends.resolve("auto", torch.zeros(2)) is backends.TORCH
    assert autotune.TUNER is tuner and not any(step.chosen for step in backends.auto.STEPS)


def test_methods_bench_dry_run(capsys):
    from bench import methods

    assert methods.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    from fa_triton import METHODS

    for method in METHODS:
        assert f"\n{method:9s}" in out
    assert "backprop (nn.Linear)" in out and "dfa (fa_triton)" in out and "DFA speedup over backprop" in out


def test_conv_bench_measures_every_provider():
    from bench import conv

    results = conv.measure(2, 3, 4, 3, 1, 1, 8, "cpu", rep_ms=5, cpu_samples=3)
    assert set(results) == {"nn.Conv2d (backprop)", "plain FA conv", "FAConv2d (fa)", "FAConv2d (usf)"}
    assert all(ms > 0 and saved > 0 and peak is None for ms, saved, peak in results.values())


def test_compile_overhead_times_both():
    from bench import compile_overhead

    result = compile_overhead.measure(batch=4, steps=2, repeats=1)
    assert set(result) == {"eager", "compiled", "nn_eager", "nn_compiled"} and all(ms > 0 for ms in result.values())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ensemble_trains_every_seed_every_way(capsys, backend):
    from bench import ensemble

    for step in ensemble.build(seeds=2, method="fa", batch=4, backend=backend):
        step()  # every way steps (a failing vmap, backward or optimizer would raise here)
    assert ensemble.main(["--quick", "--backend", backend]) == 0
    out = capsys.readouterr().out
    assert f"backend {backend}" in out and "one pass, grad" in out and "one pass / one by one:" in out
