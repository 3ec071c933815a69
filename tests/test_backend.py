"""How a backend is chosen (fa_triton/backend.py): "auto", "torch" (the reference), "triton"."""

import pytest
import torch

from fa_triton import backend, fa_linear, kernels
from tests.oracle import make_inputs


def test_auto_backend_resolution():
    cpu = torch.zeros(2, 3)
    assert backend.resolve_backend("auto", cpu) == "reference"
    assert backend.resolve_backend("torch", cpu) == "reference"
    assert backend.resolve_backend("auto", cpu.double()) == "reference"
    meta = torch.empty(2, 3, device="meta")
    assert backend.resolve_backend("auto", meta) == "reference"
    assert set(backend.BY_NAME) == {"triton", "reference", "auto"}


@pytest.mark.cuda
def test_auto_backend_uses_triton_on_cuda():
    expected = "auto" if kernels.autotune.AUTOTUNE else "triton"  # FA_TRITON_AUTOTUNE=0: Triton, untimed
    assert backend.resolve_backend("auto", torch.zeros(2, 3, device="cuda")) == expected
    assert backend.resolve_backend("auto", torch.zeros(2, 3, device="cuda", dtype=torch.float64)) == "reference"


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    monkeypatch.setattr(backend, "_RESOLVED", {})  # resolutions are remembered per key
    x, weight, b, feedback, _ = make_inputs((2,), 3, 4, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fa_linear(x, weight, b, feedback, backend="triton")


def test_resolution_is_remembered_per_key_and_failures_are_not(monkeypatch):
    monkeypatch.setattr(backend, "_RESOLVED", {})
    calls = []
    resolve = backend._resolve
    monkeypatch.setattr(backend, "_resolve", lambda *args: calls.append(args) or resolve(*args))
    for _ in range(3):
        backend.resolve_backend("auto", torch.zeros(2))
    assert len(calls) == 1
    for _ in range(2):
        with pytest.raises(TypeError, match="float64"):
            backend.resolve_backend("triton", torch.zeros(2, dtype=torch.float64))
    assert len(calls) == 3  # a failure is raised again, with its reason, every time
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.resolve_backend("cuda", torch.zeros(2))


def test_dynamo_traces_every_module_of_the_package():
    # Dynamo refuses to trace files whose path matches one of its skip patterns (such as
    # "triton/backends", which a fa_triton/backends.py would): fullgraph compile would break.
    from pathlib import Path

    from torch._dynamo import trace_rules

    package = Path(backend.__file__).parent
    skipped = {path.name: trace_rules.check_file(str(path)).reason for path in package.glob("*.py")
               if trace_rules.check_file(str(path)).skipped}
    assert not skipped, skipped
