"""The pytest-benchmark suite: every provider x mode x dtype on the shapes of ``--bench-size``.

    pytest bench/ --benchmark-only                  # time them (full sizes on a GPU)
    pytest bench/ --benchmark-only --bench-size cpu
    pytest bench/                                   # CI: each body once, tiny shapes

Each benchmark also checks its result (finite output, gradients where it ran a backward), so
the smoke run catches a broken provider. ``python -m bench.run`` times the same callables with
do_bench and writes the CSV; this suite is for pytest-benchmark's comparisons and histograms.
"""

import math

import pytest
import torch

from bench import cases as C
from bench.conftest import HAS_CUDA, bench_size

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def _plan(size: str):
    """[(case, dtype, mode, provider)] for a size."""
    if size == "smoke":
        found = C.tutorial_cases([8]) + C.square_cases([32]) + C.mlp_cases([8])
        dtypes = ["fp32"]
    elif size == "cpu":
        found = C.tutorial_cases([64, 8192]) + C.square_cases([512, 1024]) + C.mlp_cases([64, 8192])
        dtypes = ["fp32", "bf16"]
    else:
        found = C.tutorial_cases() + C.square_cases() + C.mlp_cases()
        dtypes = ["fp32", "bf16", "fp16"]
    plan = []
    for case in found:
        for dtype in dtypes:
            for mode in case.modes:
                for provider in C.PROVIDERS:
                    # torch.compile costs seconds per graph: in the smoke run, one layer case and the MLP.
                    if (size == "smoke" and provider == "compiled"
                            and not (case.family == "mlp" or (case.family == "square" and mode == "forward_backward"))):
                        continue
                    plan.append((case, dtype, mode, provider))
    return plan


def pytest_generate_tests(metafunc):
    if "bench_case" in metafunc.fixturenames:
        plan = _plan(bench_size(metafunc.config))
        ids = [f"{c.kernel}-{c.M}x{c.K}x{c.N}-{d}-{m}-{p}" for c, d, m, p in plan]
        metafunc.parametrize("bench_case", plan, ids=ids)


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.float()).all())


def test_benchmark(benchmark, bench_case):
    case, dtype, mode, provider = bench_case
    reason = C.unsupported_reason(case, provider, dtype, DEVICE)
    if reason:
        pytest.skip(reason)
    bench = C.build(case, provider, mode, dtype, DEVICE)
    bench.fn()  # compile / autotune outside the timing

    def target():
        out = bench.fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    element_size = torch.empty((), dtype=C.DTYPES[dtype]).element_size()
    benchmark.group = f"{case.label()} {dtype} {mode}"
    benchmark.extra_info.update(flops=C.flops(case, mode), min_bytes=C.min_bytes(case, mode, element_size),
                                provider=C.provider_label(provider, DEVICE), device=str(DEVICE))
    rounds = 20 if DEVICE.type == "cuda" else 5
    out = benchmark.pedantic(target, setup=bench.reset, rounds=rounds, warmup_rounds=1, iterations=1)

    if mode == "forward":
        assert out.shape == (case.M, case.N) and _finite(out)
    elif mode == "train_step":
        assert math.isfinite(out.item())
    else:
        weight, bias = bench.grad_to_none[-2:]
        assert weight.grad is not None and bias.grad is not None, "backward did not reach the parameters"
        assert _finite(weight.grad) and _finite(bias.grad)
        assert any(x.grad is not None for x in bench.grad_to_none[:-2]), "no input gradient"
