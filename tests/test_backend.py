"""The backend registry (fa_triton/ops/backends): one table from ``backend=`` to code, "auto",
"torch" (the reference), "triton", and how one is chosen for a tensor."""

import collections

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


# ------------------------------------------------ LayerSteps: the Triton steps of one layer's eager calls

LAYER_LAUNCHERS = ("fa_linear_forward", "fa_linear_local_error", "fa_linear_backward_input",
                   "fa_linear_backward_weight")


@pytest.fixture
def launcher_calls(monkeypatch):
    """Counts the layer launchers' calls: a LayerSteps step that runs its remembered plan calls none."""
    calls = collections.Counter()
    def counting(name, launcher):
        def counted(*args, **kwargs):
            calls[name] += 1
            return launcher(*args, **kwargs)
        return counted

    for name in LAYER_LAUNCHERS:
        monkeypatch.setattr(kernels, name, counting(name, getattr(kernels, name)))
    kernels.clear_plans()
    yield calls
    kernels.clear_plans()


def _leaves(layer):
    return [t for t in (layer.weight, layer.bias, layer.feedback) if t is not None and t.requires_grad]


def _layer_step(layer, x, grad_y) -> list:
    """y and every gradient of one eager step of the layer (its fast path once fitted)."""
    x = x.detach().requires_grad_()
    for t in _leaves(layer):
        t.grad = None
    y = layer(x)
    y.backward(grad_y)
    return [y.detach(), x.grad] + [t.grad for t in _leaves(layer)]


def _launcher_step(layer, x, grad_y) -> list:
    """The same step through ``fa_linear`` (the backend's Function: every step checked by its launcher)."""
    x = x.detach().requires_grad_()
    weight, bias, feedback = (None if t is None else t.detach().clone().requires_grad_(t.requires_grad)
                              for t in (layer.weight, layer.bias, layer.feedback))
    y = fa_linear(x, weight, bias, feedback, layer.activation, negative_slope=layer.negative_slope,
                  backend="triton", method=layer.method, feedback_scale=layer.feedback_scale)
    y.backward(grad_y)
    return [y.detach(), x.grad] + [t.grad for t in (weight, bias, feedback) if t is not None and t.requires_grad]


def _assert_same(result, expected):
    assert len(result) == len(expected)
    for got, want in zip(result, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same plans: the same bits


@pytest.mark.parametrize("method", ["fa", "usf", "kp"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "identity"])
def test_layer_steps_reuse_their_plans_with_the_launchers_results(activation, method, launcher_calls):
    from fa_triton import FALinear

    torch.manual_seed(0)
    layer = FALinear(7, 5, activation=activation, method=method, backend="triton")
    x, grad_y = torch.randn(6, 7), torch.randn(6, 5)
    expected = _launcher_step(layer, x, grad_y)
    launches = []
    for _ in range(3):  # checked, then the fast path: its steps' first calls, then their plans alone
        launcher_calls.clear()
        _assert_same(_layer_step(layer, x, grad_y), expected)
        launches.append(sum(launcher_calls.values()))
    assert launches[0] > 0 and launches[1] > 0 and launches[2] == 0, launches


def test_layer_steps_follow_every_change_their_plans_depend_on(launcher_calls, fp32_matmul_precision):
    from fa_triton import FALinear

    torch.manual_seed(0)
    layer = FALinear(7, 5, backend="triton")
    x, grad_y = torch.randn(6, 7), torch.randn(6, 5)

    def check(x, grad_y, first: str, every: str = ""):
        """Run the step twice, each against the launchers' result; ``first``: the launchers that the
        first call must go through (the steps whose plan depends on what changed), ``every``: those
        that every call goes through."""
        for call in range(2):
            launcher_calls.clear()
            _assert_same(_layer_step(layer, x, grad_y), _launcher_step(layer, x, grad_y))
            launched = launcher_calls - collections.Counter(LAYER_LAUNCHERS)  # less _launcher_step's own
            steps = (first if call == 0 else every).split()
            expected = {name for name in LAYER_LAUNCHERS if name.split("_linear_")[1] in steps}
            assert set(launched) == expected, (call, launched)

    layer(x)  # records the layer's fit: its LayerSteps start empty
    every_step = "forward local_error backward_input backward_weight"
    check(x, grad_y, every_step)
    check(torch.randn(9, 7), torch.randn(9, 5), every_step)  # another batch size
    check(x, grad_y, every_step)  # and back
    x_transposed = torch.randn(7, 6).t()
    check(x_transposed, grad_y, "forward backward_weight")
    check(x_transposed, torch.randn(5, 6).t(), "local_error")  # grad_y transposed (δ: the pass's own, contiguous)
    check(x, grad_y, "forward local_error backward_weight")  # and back
    layer.weight.data = layer.weight.data.t().contiguous().t()  # the same values, W's strides (1, 7)
    check(x, grad_y, "forward")
    layer.feedback.data = layer.feedback.data.t().contiguous().t()
    check(x, grad_y, "backward_input")
    fp32_matmul_precision(True)  # the dots' precision is part of every GEMM's plan
    check(x, grad_y, "forward backward_input backward_weight")
    fp32_matmul_precision(False)
    check(x, grad_y, "forward backward_input backward_weight")
    kernels.clear_plans()
    check(x, grad_y, every_step)
    bias = layer.bias.data
    layer.bias.data = torch.stack([bias, bias], dim=1)[:, 0]  # strides (2,): the launcher copies it at every call
    check(x, grad_y, "forward", every="forward")
    layer.bias.data = bias
    check(x, grad_y, "")  # the plan of the unit-stride bias was kept
    layer.weight.data = layer.weight.data.contiguous()
    check(x, grad_y, "forward")
    # Tensors of other sizes through .data, with the strides unchanged: never run on the old plans
    # (which would read past them), but refused as the launchers refuse them.
    layer.bias.data = torch.randn(4)
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        layer(x)
    layer.bias.data = bias
    feedback = layer.feedback.data
    layer.feedback.data = torch.randn(5, 7)[:, :6]  # B's strides, in_features 6: grad_x [6, 6] where x is [6, 7]
    with pytest.raises(RuntimeError, match="invalid gradient"):
        _layer_step(layer, x, grad_y)
    layer.feedback.data = feedback
    check(x, grad_y, "backward_input")  # the refused call's plan was the last one kept
    layer.weight.data = torch.randn(4, 7)  # out_features 4 (the fit sees only in_features)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        layer(x)


def test_layer_steps_tell_operands_of_equal_strides_apart(launcher_calls):
    # Views of one buffer: the same strides whatever their sizes. Each step must go through its
    # launcher again for new sizes (M, then N, then K), never run a plan made for others.
    from fa_triton.ops.backends import TRITON, LayerSteps
    from fa_triton.rules.methods import rule_for

    torch.manual_seed(0)
    base, other = torch.randn(16, 16), torch.randn(16, 16)

    def view(rows, cols, buffer=base):
        return buffer[:rows, :cols]

    rule = rule_for("fa")
    sizes = ((5, 4, 7), (6, 4, 7), (6, 3, 7), (6, 3, 6))  # M, then N, then K changed
    steps = [  # (launcher, step, the sizes (M, N, K) of its calls in turn)
        ("fa_linear_forward", lambda s, m, n, k: s.forward(view(m, k), view(n, k, other), other[0, :n], "relu", 0.0,
                                                           False), sizes),
        ("fa_linear_local_error", lambda s, m, n, k: s.local_error(view(m, n), view(m, n, other), "relu", 0.0, True,
                                                                   True), sizes[:3]),  # the pass has no K
        # saved transposed, first at the last call's sizes: only its strides changed
        ("fa_linear_local_error", lambda s, m, n, k: s.local_error(view(m, n), view(n, m, other).t(), "relu", 0.0,
                                                                   True, True), sizes[2:0:-1]),
        ("fa_linear_local_error", lambda s, m, n, k: s.local_error(view(m, n), None, "identity", 0.0, False, True),
         sizes[1:3]),
        ("fa_linear_backward_input", lambda s, m, n, k: (s.backward_input(view(m, n), view(n, k, other), None, None,
                                                                          rule),), sizes),
        ("fa_linear_backward_weight", lambda s, m, n, k: (s.backward_weight(view(m, n), view(m, k, other)),), sizes),
    ]
    layer_steps = LayerSteps()
    for name, step, calls in steps:  # one LayerSteps: each step follows the last one's call of it
        for m_n_k in calls:
            for call in range(2):
                launcher_calls.clear()
                got = step(layer_steps, *m_n_k)
                assert launcher_calls[name] == (1 if call == 0 else 0), (name, m_n_k, call)
                _assert_same(got, step(TRITON, *m_n_k))


def test_layer_steps_form_no_b_for_an_empty_batch(monkeypatch):
    # As the launcher: a sign rule's B is formed only for rows to send back through it.
    from fa_triton import FALinear

    formed = []
    kernel = kernels.launchers.JIT_KERNELS["feedback_kernel"]
    run = kernel.run
    monkeypatch.setattr(kernel, "run", lambda *args, **kwargs: formed.append(1) or run(*args, **kwargs))
    layer = FALinear(7, 5, method="usf", backend="triton")
    for rows in (3, 3, 3, 0):  # checked, then the layer's steps (their plans kept)
        formed.clear()
        x = torch.randn(rows, 7, requires_grad=True)
        layer(x).sum().backward()
        assert x.grad.shape == (rows, 7) and len(formed) == (1 if rows else 0), (rows, formed)
