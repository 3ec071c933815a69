"""The torch.library ops (fa_triton/ops.py): opcheck, parity with the autograd Functions,
gradcheck of the reference path, and torch.compile(fullgraph=True) against eager.

Without a GPU the Triton ops run on CPU tensors through Triton's interpreter (conftest.py),
so shapes stay small; compile tests are few (compiling on 2 CPU cores is slow).
"""

import contextlib

import pytest
import torch
from torch import nn

from fa_triton import ACTIVATIONS, DFANetwork, FAConv2d, FALinear, FASequential, fa_linear
from fa_triton.ops import backends
from fa_triton.ops.library import fa_linear_op
from fa_triton.rules.methods import FA_RULE
from tests.helpers import KERNEL_DEVICE
from tests.oracle import make_inputs

BACKENDS = ["torch", "triton"]


def op_device(backend: str) -> str:
    # The reference ops run anywhere; the Triton ops where the kernels do.
    return KERNEL_DEVICE if backend == "triton" else "cpu"


# ------------------------------------------------------------------------------ opcheck

FA = ("fa", 1.0, 0)  # the op arguments of FA's FeedbackRule: method, scale, seed


def forward_samples(device):
    x, weight, bias, feedback, _ = make_inputs((6,), 9, 5, torch.float32, device)
    x_t = x.t().contiguous().t()  # stride (1, 6): the ops take any strides
    leaf = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    counter = torch.tensor([3], dtype=torch.int64, device=device)
    return [
        (leaf(x), leaf(weight), leaf(bias), feedback, None, "gelu", 0.01, *FA),  # also returns f'(z)
        (leaf(x), leaf(weight), None, feedback, None, "relu", 0.01, *FA),
        (x_t, weight, bias, feedback, None, "leaky_relu", -0.2, *FA),  # z kept (negative slope); no grad
        (leaf(x), weight, leaf(bias), feedback, None, "identity", 0.01, *FA),
        (leaf(x), leaf(weight), leaf(bias), None, None, "tanh", 0.01, "usf", 0.3, 0),
        (leaf(x), leaf(weight), None, None, counter, "relu", 0.01, "brsf", 0.5, 7),
        (leaf(x), leaf(weight), leaf(bias), leaf(feedback), None, "relu", 0.01, "kp", 1.0, 0),
    ]


def backward_samples(device):
    """Arguments of the three backward ops: (local_error, backward_input, backward_weight)."""
    x, weight, bias, feedback, grad_y = make_inputs((6,), 9, 5, torch.float32, device, activation="tanh")
    saved = torch.tanh(x @ weight.t() + bias)
    delta = grad_y * (1 - saved * saved)
    counter = torch.tensor([3], dtype=torch.int64, device=device)
    return [
        ((grad_y, saved, "tanh", 0.01, True, True), (delta, feedback, None, None, *FA[:3]), (delta, x)),
        ((grad_y, None, "identity", 0.01, True, False), (grad_y, feedback, None, None, *FA[:3]), (grad_y, x)),
        ((grad_y.t().contiguous().t(), saved, "relu", 0.01, False, True),
         (delta.t().contiguous().t(), feedback, None, None, *FA[:3]), (delta[:1].expand(6, 5), x.t().contiguous().t())),
        ((grad_y, None, "identity", 0.01, False, True), (delta, None, weight, None, "usf", 0.3, 0), (delta, x)),
        ((grad_y[:1].expand(6, 5), saved, "gelu", 0.01, True, False),
         (delta, feedback, weight, None, "frsf", 1.0, 0), (delta, x)),
        ((grad_y.t().contiguous().t(), saved, "tanh", 0.01, True, True), (delta, feedback, None, None, *FA),
         (delta, x)),  # δ of a transposed g: contiguous, as the fake says
        ((grad_y.t().contiguous().t(), None, "identity", 0.01, True, True), (delta, feedback, None, None, *FA),
         (delta, x)),
        ((grad_y, saved, "leaky_relu", -0.2, True, True), (delta, None, weight, counter, "brsf", 0.5, 7),
         (delta, x)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_forward(backend):
    forward = backends.get(backend).ops[0]
    for args in forward_samples(op_device(backend)):
        torch.library.opcheck(forward, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_backward(backend):
    _, local_error, backward_input, backward_weight = backends.get(backend).ops
    for error_args, input_args, weight_args in backward_samples(op_device(backend)):
        torch.library.opcheck(local_error, error_args)
        torch.library.opcheck(backward_input, input_args)
        torch.library.opcheck(backward_weight, weight_args)


def _stacked(args, models=2):
    """The op's arguments for ``models`` models: each floating tensor stacked in front (a leaf
    again where it was one), the rest (brsf's counter, flags) as they are."""
    def stack(t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return t
        return torch.stack([t.detach()] * models).requires_grad_(t.requires_grad)
    return tuple(stack(a) for a in args)


def test_opcheck_stacked_ops():
    # The E-models family the vmap rule runs (fa_triton::triton_stacked_*): its fakes, schemas
    # and autograd as the 2-D ops'.
    forward, local_error, backward_input, backward_weight = backends.TRITON_STACKED.ops
    for args in forward_samples(KERNEL_DEVICE):
        torch.library.opcheck(forward, _stacked(args))
    for error_args, input_args, weight_args in backward_samples(KERNEL_DEVICE):
        torch.library.opcheck(local_error, _stacked(error_args))
        torch.library.opcheck(backward_input, _stacked(input_args))
        torch.library.opcheck(backward_weight, _stacked(weight_args))


def test_opcheck_draw_ops():
    # brsf's draw-number ops: fa_triton::next_draw (advances the counter in place) and
    # fa_triton::unstacked_draw (the aten form's copy); schemas, fakes, vmap rules that refuse.
    from fa_triton.ops.autograd import unstacked_draw

    for op in (torch.ops.fa_triton.next_draw.default, unstacked_draw):
        torch.library.opcheck(op, (torch.tensor([3], dtype=torch.int64),),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
        with pytest.raises(ValueError, match="stack_module_state cannot stack"):
            torch.func.vmap(op)(torch.zeros(2, 1, dtype=torch.int64))


def test_ops_are_registered():
    for name in ("forward", "local_error", "backward_input", "backward_weight"):
        for family in ("triton", "torch", "auto", "triton_stacked"):
            assert hasattr(torch.ops.fa_triton, f"{family}_{name}")


# ------------------------------------------------- the op path equals the eager Functions

def run(fn, x, weight, bias, feedback, grad_y, requires):
    leaves = [t.detach().clone().requires_grad_(r) if t is not None else None
              for t, r in zip((x, weight, bias), requires)]
    y = fn(*leaves, feedback)
    y.backward(grad_y)
    return [y.detach()] + [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "activation, negative_slope, requires",
    [(a, 0.01, (True, True, True)) for a in ACTIVATIONS]
    + [("leaky_relu", -0.2, (True, True, True)),
       ("tanh", 0.01, (False, False, True)),  # frozen weight, trainable bias
       ("gelu", 0.01, (True, False, False)),
       ("relu", 0.01, (False, True, False))],
)
def test_op_path_matches_functions(backend, activation, negative_slope, requires):
    # Eager mode runs the autograd Functions, compiled code the ops: both must agree exactly.
    device = op_device(backend)
    x, weight, bias, feedback, grad_y = make_inputs((2, 3), 11, 6, torch.float32, device, activation=activation,
                                                    negative_slope=negative_slope)
    eager = run(lambda x, w, b, f: fa_linear(x, w, b, f, activation, negative_slope=negative_slope, backend=backend),
                x, weight, bias, feedback, grad_y, requires)
    via_ops = run(lambda x, w, b, f: fa_linear_op(x, w, b, f, None, activation, negative_slope, FA_RULE,
                                                  backends.get(backend)),
                  x, weight, bias, feedback, grad_y, requires)
    for name, a, b in zip(("y", "grad_x", "grad_weight", "grad_bias"), eager, via_ops):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape and a.dtype == b.dtype, name
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------- gradcheck

@pytest.mark.parametrize("activation, negative_slope", [(a, 0.01) for a in ACTIVATIONS] + [("leaky_relu", -0.3)])
@pytest.mark.parametrize("path", ["function", "ops"])
def test_gradcheck_reference_with_feedback_equal_to_weight(activation, negative_slope, path):
    # With B = W, FA's gradient is the true derivative, which gradcheck checks numerically.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True)
    if path == "function":
        layer = lambda x, w, b: fa_linear(x, w, b, w, activation, negative_slope=negative_slope, backend="torch")  # noqa: E731
    else:
        layer = lambda x, w, b: fa_linear_op(x, w, b, w, None, activation, negative_slope, FA_RULE,  # noqa: E731
                                             backends.TORCH)
    assert torch.autograd.gradcheck(layer, (x, weight, bias))


def test_gradcheck_fails_with_random_feedback():
    # The check above can fail: with B != W, grad_x is not the derivative.
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(4, 5, dtype=torch.float64, generator=gen)
    feedback = torch.randn(4, 5, dtype=torch.float64, generator=gen)
    assert not torch.autograd.gradcheck(
        lambda x: fa_linear(x, weight, None, feedback, "tanh", backend="torch"), (x,), raise_exception=False
    )


# ------------------------------------------------------------------------ torch.compile

def mlp(backend, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(
        FALinear(12, 16, activation="gelu", backend=backend, device=device, dtype=dtype),
        FALinear(16, 8, activation="leaky_relu", negative_slope=-0.1, backend=backend, device=device, dtype=dtype),
        FALinear(8, 8, activation="relu", backend=backend, device=device, dtype=dtype),
        FALinear(8, 3, bias=False, activation="identity", backend=backend, device=device, dtype=dtype),
    )


def outputs_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    (y * torch.arange(y.numel(), device=y.device).view(y.shape).sin()).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_compile_fullgraph_matches_eager_cpu(backend):
    # "auto" on the CPU is the reference ops; "triton" the kernels' ops under the interpreter.
    torch._dynamo.reset()
    model = mlp(backend, device=op_device("triton") if backend == "triton" else "cpu")
    compiled_model = torch.compile(model, fullgraph=True)
    # A second batch shape recompiles with symbolic sizes: the fake kernels must follow.
    for shape in [(2, 5, 12), (9, 12)]:
        x = torch.randn(*shape, device=model[0].weight.device)
        eager = outputs_and_grads(model, x)
        compiled = outputs_and_grads(compiled_model, x)
        assert len(compiled) == len(eager) == 2 + 7
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def _small_model(kind, method):
    """(a small model of ``kind``, its input's shape)."""
    if kind == "FAConv2d":
        return nn.Sequential(FAConv2d(3, 4, 3, method=method), nn.Flatten()), (2, 3, 6, 6)
    if kind == "DFANetwork":
        return DFANetwork([FALinear(12, 8), FALinear(8, 3, activation="identity")]), (5, 12)
    layers = FALinear(12, 8, method=method), FALinear(8, 3, activation="identity", method=method)
    return (FASequential if kind == "FASequential" else nn.Sequential)(*layers), (5, 12)


@pytest.mark.parametrize("kind, method", [(kind, method) for kind in ("FALinear", "FASequential", "FAConv2d")
                                          for method in ("fa", "brsf")] + [("DFANetwork", "dfa")])
def test_compiled_model_is_not_recompiled_by_calls(kind, method):
    # The modules' lazily filled state (a layer's rule, the backend resolved per device and
    # dtype, the eager fast path's record, FASequential's plan) is not read while tracing:
    # neither a second compiled call nor an eager call in between invalidates the graph. A
    # guard on that state would recompile it.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, shape = _small_model(kind, method)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(shape)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x).sum().backward()
        compiled(x).sum().backward()
        model(x).sum().backward()
        compiled(x).sum().backward()
    if kind == "FALinear":  # a compiled call leaves the eager call's fast-path record alone
        assert model[0]._fit is not None


def _compiled_graphs(model, x, autocast=False):
    """(eager results, compiled results, {"forward": targets, "backward": targets}) of one
    fullgraph compile of ``model``, recording the aten/custom ops of its graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    graphs = {"forward": [], "backward": []}

    def recorder(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        eager = outputs_and_grads(model, x)
        compiled = outputs_and_grads(torch.compile(model, fullgraph=True, backend=backend), x)
    assert len(graphs["forward"]) == 1 and len(graphs["backward"]) == 1
    targets = {kind: [str(node.target) for gm in gms for node in gm.graph.nodes if node.op == "call_function"]
               for kind, gms in graphs.items()}
    return eager, compiled, targets


def test_compiled_reference_is_plain_aten_ops():
    # The reference backend (auto on the CPU) is traced through, not an opaque op: its matmuls
    # and elementwise ops are aten ops Inductor can fuse; under autocast it runs in bf16 like eager.
    eager, compiled, targets = _compiled_graphs(mlp("auto"), torch.randn(7, 12), autocast=True)
    assert eager[0].dtype == compiled[0].dtype == torch.bfloat16
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    assert not any("fa_triton" in t for t in targets["forward"] + targets["backward"])
    assert sum(t.startswith(("aten.addmm", "aten.mm")) for t in targets["forward"]) == 4
    assert sum(t.startswith("aten.mm") for t in targets["backward"]) >= 7  # 4 grad_W, 3 grad_x


def test_compiled_kernels_are_the_custom_ops():
    # The kernels' path is one opaque op per step: the forward op per layer in the forward graph,
    # the backward ops in the backward graph.
    model = mlp("triton", device=op_device("triton"))
    eager, compiled, targets = _compiled_graphs(model, torch.randn(7, 12, device=model[0].weight.device))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert targets["forward"].count("fa_triton.triton_forward.default") == 4
    assert targets["backward"].count("fa_triton.triton_backward_input.default") == 4  # x requires grad too
    assert targets["backward"].count("fa_triton.triton_backward_weight.default") == 4
    assert not any(t.startswith("fa_triton.torch_") for t in targets["forward"] + targets["backward"])


def test_export_traces_the_layer():
    # torch.export of the reference path (CPU): plain aten ops, the same results.
    model = mlp("auto")
    x = torch.randn(6, 12)
    exported = torch.export.export(model, (x,))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert not any("fa_triton" in t for t in targets)
    assert torch.equal(exported.module()(x), model(x))
    triton_model = mlp("triton", device=op_device("triton"))
    xt = torch.randn(6, 12, device=triton_model[0].weight.device)
    exported = torch.export.export(triton_model, (xt,))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count("fa_triton.triton_forward.default") == 4
    torch.testing.assert_close(exported.module()(xt), triton_model(xt), rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph_matches_eager_cuda(dtype):
    torch._dynamo.reset()
    model = mlp("auto", device="cuda", dtype=dtype)
    x = torch.randn(64, 12, device="cuda", dtype=dtype)
    eager = outputs_and_grads(model, x)
    compiled = outputs_and_grads(torch.compile(model, fullgraph=True), x)
    for a, b in zip(eager, compiled):
        # The same kernels run in both: only Inductor's own code around them may differ.
        torch.testing.assert_close(b, a, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_opcheck_cuda(dtype):
    def cast(args):  # floating tensors to dtype (brsf's int64 counter stays)
        return tuple(a.to(dtype).detach().requires_grad_(a.requires_grad)
                     if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    for backend in BACKENDS:
        forward, backward_input, backward_weight = backends.get(backend).ops
        for args in forward_samples("cuda"):
            torch.library.opcheck(forward, cast(args))
        for input_args, weight_args in backward_samples("cuda"):
            torch.library.opcheck(backward_input, cast(input_args))
            torch.library.opcheck(backward_weight, cast(weight_args))
