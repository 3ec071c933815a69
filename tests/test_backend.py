"""The backend registry (fa_triton/ops/backends): one table from ``backend=`` to code, "auto",
"torch" (the reference), "triton", and how one is chosen for a tensor."""

import pytest
import torch

from fa_triton import fa_linear, kernels
from fa_triton.ops import backends
from fa_triton.ops.backends import registry
from tests.oracle import make_inputs


def test_one_registry_of_three_backends_with_the_same_steps():
    assert set(backends.REGISTRY) == set(backends.BACKENDS) == {"auto", "triton", "torch"}
    for name, backend in backends.REGISTRY.items():
        assert backend.name == name and backends.get(name) is backend
        for step in ("forward", "local_error", "backward_input", "backward_weight", "dfa_delta"):
            assert callable(getattr(backend, step)), (name, step)
        # The op layer registered its Function and its torch.library ops on each.
        assert backend.function is not None and len(backend.ops) == 4
    for name in ("forward", "local_error", "backward_input", "backward_weight"):
        for family in backends.BACKENDS:
            assert hasattr(torch.ops.fa_triton, f"{family}_{name}")


def test_auto_backend_resolution():
    cpu = torch.zeros(2, 3)
    assert backends.resolve("auto", cpu) is backends.TORCH
    assert backends.resolve("torch", cpu) is backends.TORCH
    assert backends.resolve("auto", cpu.double()) is backends.TORCH
    meta = torch.empty(2, 3, device="meta")
    assert backends.resolve("auto", meta) is backends.TORCH


@pytest.mark.cuda
def test_auto_backend_uses_triton_on_cuda():
    expected = backends.AUTO if kernels.autotune.AUTOTUNE else backends.TRITON  # FA_TRITON_AUTOTUNE=0: untimed
    assert backends.resolve("auto", torch.zeros(2, 3, device="cuda")) is expected
    assert backends.resolve("auto", torch.zeros(2, 3, device="cuda", dtype=torch.float64)) is backends.TORCH


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    monkeypatch.setattr(registry, "_RESOLVED", {})  # resolutions are remembered per key
    x, weight, b, feedback, _ = make_inputs((2,), 3, 4, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fa_linear(x, weight, b, feedback, backend="triton")


def test_resolution_is_remembered_per_key_and_failures_are_not(monkeypatch):
    monkeypatch.setattr(registry, "_RESOLVED", {})
    calls = []
    resolve = registry._resolve
    monkeypatch.setattr(registry, "_resolve", lambda *args: calls.append(args) or resolve(*args))
    for _ in range(3):
        backends.resolve("auto", torch.zeros(2))
    assert len(calls) == 1
    for _ in range(2):
        with pytest.raises(TypeError, match="float64"):
            backends.resolve("triton", torch.zeros(2, dtype=torch.float64))
    assert len(calls) == 3  # a failure is raised again, with its reason, every time
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.resolve("cuda", torch.zeros(2))


def test_a_layer_without_kernels_refuses_triton_by_name():
    with pytest.raises(ValueError, match=r"FAConv2d's backend .*no Triton kernels.* got 'triton'"):
        backends.check_backend("triton", ("auto", "torch"), "FAConv2d's backend (it has no Triton kernels)")
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch'\), got 'cuda'"):
        backends.check_backend("cuda", ("auto", "torch"), "FAConv2d's backend")


def test_dynamo_traces_every_module_of_the_package():
    # Dynamo refuses to trace files whose path matches one of its skip patterns (such as
    # "triton/backends", which a fa_triton/backends.py would): fullgraph compile would break.
    from pathlib import Path

    from torch._dynamo import trace_rules

    package = Path(backends.__file__).parent.parent.parent
    files = [path for path in package.rglob("*.py")]
    assert len(files) > 20
    skipped = {str(path.relative_to(package)): trace_rules.check_file(str(path)).reason for path in files
               if trace_rules.check_file(str(path)).skipped}
    assert not skipped, skipped
