"""FASequential (fa_triton/layers/sequential.py) and its Function (fa_triton/ops/sequential.py):
a chain of FA layers as one autograd Function, against the float64 oracle of the chain's
equations and against the same layers run one by one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fa_triton
from fa_triton import FALinear, FASequential
from fa_triton.testing import activation_and_derivative, layer_feedback
from tests.helpers import KERNEL_DEVICE
from tests.oracle import assert_parity

ALL_METHODS = fa_triton.METHODS
# (in, out, activation, negative_slope) per layer: every activation, a negative slope (its f'
# reads z), a width of 1.
LAYERS = ((7, 13, "gelu", 0.01), (13, 1, "leaky_relu", -0.2), (1, 9, "tanh", 0.01), (9, 6, "sigmoid", 0.01),
          (6, 5, "relu", 0.01), (5, 4, "identity", 0.01))


def _layers(method, backend="torch", dtype=torch.float64, device="cpu", layers=LAYERS, seed=0):
    torch.manual_seed(seed)
    return [FALinear(n_in, n_out, activation=activation, negative_slope=slope, method=method, backend=backend,
                     dtype=dtype, device=device) for n_in, n_out, activation, slope in layers]


def _counters(layers):
    return [layer.counter.clone() if layer.method == "brsf" else None for layer in layers]


def _restore(layers, counters):
    for layer, counter in zip(layers, counters):
        if counter is not None:
            layer.counter.copy_(counter)


def _run(model, x, grad_y):
    """y and every gradient (x, then each parameter by name), on fresh gradients."""
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.backward(grad_y)
    grads = {name: p.grad for name, p in model.named_parameters()}
    return {"y": y.detach(), "grad_x": x.grad, **grads}, y.grad_fn


def chain_oracle(layers, x, grad_y) -> dict:
    """The chain's y and gradients in float64 from the equations: z_l = h_{l-1} W_lᵀ + b_l,
    h_l = f_l(z_l); δ_L = g ⊙ f_L'(z_L), δ_{l-1} = (δ_l B_l) ⊙ f_{l-1}'(z_{l-1}); grad_W_l =
    δ_lᵀ h_{l-1}, grad_b_l = Σ_rows δ_l, grad_x = δ_1 B_1, with each B_l from its rule's
    equations (``layer_feedback``: after the forward, brsf's draw). Keys as ``_run``'s."""
    h = [x.double().reshape(-1, x.shape[-1])]
    derivatives = []
    for layer in layers:
        z = h[-1] @ layer.weight.detach().double().t() + layer.bias.detach().double()
        y, derivative = activation_and_derivative(z, layer.activation, layer.negative_slope)
        h.append(y)
        derivatives.append(derivative)
    delta = grad_y.double().reshape(h[-1].shape) * derivatives[-1]
    result = {"y": h[-1].reshape(*x.shape[:-1], -1)}
    for index in range(len(layers) - 1, -1, -1):
        B = layer_feedback(layers[index])
        result[f"{index}.weight"] = delta.t() @ h[index]
        result[f"{index}.bias"] = delta.sum(0)
        if layers[index].method == "kp":
            result[f"{index}.feedback"] = result[f"{index}.weight"]
        delta = delta @ B
        if index:
            delta = delta * derivatives[index - 1]
    result["grad_x"] = delta.reshape(x.shape)
    return result


@pytest.mark.parametrize("method", ALL_METHODS)
def test_chain_matches_the_float64_oracle_and_the_layers_one_by_one(method):
    layers = _layers(method)
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    grad_y = torch.randn(2, 3, 4, dtype=torch.float64)
    counters = _counters(layers)
    fused, grad_fn = _run(FASequential(*layers), x, grad_y)
    # backprop on the reference: PyTorch's own autograd, layer by layer (nothing to fuse)
    assert ("FASequentialFunction" in grad_fn.name()) == (method != "backprop")
    expected = chain_oracle(layers, x, grad_y)  # brsf: B of the draws this forward made
    assert set(fused) == set(expected)
    for name, want in expected.items():
        assert_parity(fused[name], want, torch.float64, name=name)
    _restore(layers, counters)
    one_by_one, grad_fn = _run(nn.Sequential(*layers), x, grad_y)
    assert "FASequentialFunction" not in grad_fn.name()
    for name in expected:  # the reference backend: the same ops on the same values
        assert torch.equal(fused[name], one_by_one[name]), name


@pytest.mark.parametrize("method", ALL_METHODS)
def test_kernels_chain_matches_the_layers_one_by_one(method):
    """Triton kernels (the interpreter on the CPU): the chain's fused steps against each layer's
    own, within torch.testing's fp32 tolerance (f' applied to the accumulator rounds once less)."""
    sizes = ((7, 13, "gelu", 0.01), (13, 1, "leaky_relu", -0.2), (1, 6, "sigmoid", 0.01), (6, 5, "relu", 0.01),
             (5, 4, "identity", 0.01))
    layers = _layers(method, "triton", torch.float32, KERNEL_DEVICE, layers=sizes)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 7, generator=gen).to(KERNEL_DEVICE)
    grad_y = torch.randn(7, 4, generator=gen).to(KERNEL_DEVICE)
    counters = _counters(layers)
    fused, grad_fn = _run(FASequential(*layers), x, grad_y)
    assert "FASequentialFunction" in grad_fn.name()
    _restore(layers, counters)
    one_by_one, _ = _run(nn.Sequential(*layers), x, grad_y)
    assert set(fused) == set(one_by_one)
    for name, want in one_by_one.items():
        torch.testing.assert_close(fused[name], want, msg=lambda text, name=name: f"{name}: {text}")


def test_backprop_chain_equals_autograd_through_nn_linear():
    layers = _layers("backprop")
    model = FASequential(*layers)
    plain = nn.Sequential(*[m for layer in layers for m in (
        nn.Linear(layer.in_features, layer.out_features, dtype=torch.float64), _module_of(layer))])
    for layer, linear in zip(layers, plain[::2]):
        linear.load_state_dict({"weight": layer.weight.detach(), "bias": layer.bias.detach()})
    x = torch.randn(5, 7, dtype=torch.float64)
    grad_y = torch.randn(5, 4, dtype=torch.float64)
    fused, _ = _run(model, x, grad_y)
    exact, _ = _run(plain, x, grad_y)
    assert_parity(fused["grad_x"], exact["grad_x"], torch.float64, name="grad_x")
    for index in range(len(layers)):
        assert_parity(fused[f"{index}.weight"], exact[f"{2 * index}.weight"], torch.float64, name=f"{index}.weight")
        assert_parity(fused[f"{index}.bias"], exact[f"{2 * index}.bias"], torch.float64, name=f"{index}.bias")


def _module_of(layer):
    return {"gelu": nn.GELU(), "leaky_relu": nn.LeakyReLU(layer.negative_slope), "tanh": nn.Tanh(),
            "sigmoid": nn.Sigmoid(), "relu": nn.ReLU(), "identity": nn.Identity()}[layer.activation]


def test_only_the_gradients_asked_for(monkeypatch):
    """Frozen parameters get no gradient and cost no GEMM; x without a gradient costs no grad_x."""
    from fa_triton.ops.backends import TORCH

    calls = {"backward_input": 0, "backward_weight": 0}
    for step in calls:
        original = getattr(TORCH, step)

        def counted(*args, _step=step, _original=original):
            calls[_step] += 1
            return _original(*args)
        monkeypatch.setattr(TORCH, step, counted)
    layers = _layers("fa")
    layers[2].weight.requires_grad_(False)
    layers[0].bias.requires_grad_(False)
    model = FASequential(*layers)
    x = torch.randn(3, 7, dtype=torch.float64)
    y = model(x)  # x needs no gradient: no grad_x
    y.sum().backward()
    assert calls == {"backward_input": 0, "backward_weight": len(layers) - 1}
    assert layers[2].weight.grad is None and layers[0].bias.grad is None
    assert layers[2].bias.grad is not None and layers[0].weight.grad is not None
    expected = chain_oracle(layers, x, torch.ones_like(y))
    assert_parity(layers[0].weight.grad, expected["0.weight"], torch.float64, name="0.weight")
    model(x.requires_grad_(True)).sum().backward()
    assert calls["backward_input"] == 1


def test_the_first_layer_s_feedback_may_change_before_backward_when_x_needs_no_gradient():
    layers = _layers("wm")
    model = FASequential(*layers)
    x = torch.randn(3, 7, dtype=torch.float64)
    y = model(x)
    layers[0].mirror()  # B_1 is not read without grad_x: no error, as layer by layer
    y.sum().backward()
    y = model(x)
    layers[1].mirror()  # B_2 is read by the chain step: the in-place change is caught
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_an_empty_batch():
    model = FASequential(*_layers("fa"))
    x = torch.randn(0, 7, dtype=torch.float64, requires_grad=True)
    y = model(x)
    y.sum().backward()
    assert y.shape == (0, 4) and x.grad.shape == (0, 7)
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_brsf_draws_as_the_layers_one_by_one():
    layers = _layers("brsf")
    model = FASequential(*layers)
    before = [layer.counter.item() for layer in layers]
    model(torch.randn(2, 7, dtype=torch.float64)).sum().backward()
    assert [layer.counter.item() for layer in layers] == [count + 1 for count in before]
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 7, dtype=torch.float64))
    assert [layer.counter.item() for layer in layers] == [count + 1 for count in before]


def test_state_dict_keys_are_nn_sequential_s_and_load_either_way():
    layers = _layers("kp")
    model = FASequential(*layers)
    plain = nn.Sequential(*_layers("kp", seed=1))
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4, 7, dtype=torch.float64)
    assert torch.equal(plain(x), model(x))
    model.load_state_dict(nn.Sequential(*_layers("kp", seed=2)).state_dict())


def test_widths_that_do_not_chain_are_not_fused_and_fail_clearly_in_forward():
    model = FASequential(FALinear(7, 13), FALinear(9, 4))
    assert "fused=[]" in repr(model) and "0 gives 13 features but 1 takes 9: not fused" in repr(model)
    with pytest.raises(ValueError, match=r"in_features=9.*got x of shape \(2, 13\)"):
        model(torch.randn(2, 7))
    model = fa_triton.models.mlp((7, 6, 5, 3), backend="torch")
    assert type(model[::2]) is FASequential and "fused=[]" in repr(model[::2])  # slicing works
    model.append(FALinear(7, 2))  # printing never raises
    assert "2 gives 3 features but 3 takes 7" in repr(model)


def test_other_children_run_on_their_own_and_the_printout_says_so():
    model = FASequential(nn.Flatten(), FALinear(12, 8), nn.Identity(), FALinear(8, 6), nn.Dropout(0.0),
                         FALinear(6, 5), FALinear(5, 3))
    text = repr(model)
    assert "fused=[(1, 3), (5, 6)]" in text
    assert "4 (Dropout) is not an FALinear" in text
    x = torch.randn(2, 3, 4)
    assert model(x).shape == (2, 3)


def test_a_lone_layer_and_another_backend_are_not_fused():
    model = FASequential(FALinear(6, 5, backend="torch"), FALinear(5, 3, backend="auto"))
    assert "fused=[]" in repr(model) and "1 has backend='auto'" in repr(model)
    y = model(torch.randn(2, 6, requires_grad=True))
    assert "FASequentialFunction" not in y.grad_fn.name()


def test_autocast_hooks_and_mismatched_dtypes_take_the_per_layer_path():
    layers = _layers("fa", dtype=torch.float32)
    model = FASequential(*layers)
    x = torch.randn(3, 7, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16 and "FASequentialFunction" not in y.grad_fn.name()
    handle = layers[1].register_forward_hook(lambda module, args, out: out * 2)
    doubled = model(x)
    assert "1 has hooks: it runs on its own" in repr(model) and "fused=[(2, 3, 4, 5)]" in repr(model)
    handle.remove()
    assert "fused=[(0, 1, 2, 3, 4, 5)]" in repr(model)
    assert not torch.equal(doubled, model(x))  # the hook ran
    layers[1].double()
    with pytest.raises(TypeError, match="dtype"):  # the layer's own clear error
        model(x)


def test_convert_makes_chains_with_the_same_keys_and_numbers():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    torch.manual_seed(1)
    converted = fa_triton.convert(plain, backend="torch")
    torch.manual_seed(1)
    unchained = fa_triton.convert(plain, backend="torch", chains=False)
    assert type(converted) is FASequential and type(unchained) is nn.Sequential
    assert "fused=[(1, 3, 5)]" in repr(converted)
    assert list(converted.state_dict()) == list(unchained.state_dict())
    x = torch.randn(4, 3, 4)
    fused, grad_fn = _run(converted, x, torch.ones(4, 3))
    one_by_one, _ = _run(unchained, x, torch.ones(4, 3))
    assert "FASequentialFunction" in grad_fn.name()
    for name in one_by_one:
        assert torch.equal(fused[name], one_by_one[name]), name
    nested = fa_triton.convert(nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))))
    assert type(nested) is nn.Sequential and type(nested[0]) is FASequential


def test_models_mlp_is_a_chain():
    model = fa_triton.models.mlp(backend="torch")
    assert type(model) is FASequential and "fused=[(0, 1, 2)]" in repr(model)


def test_compile_fullgraph_runs_each_layer_traced():
    model = FASequential(*_layers("fa", dtype=torch.float32, layers=((7, 5, "relu", 0.01), (5, 3, "identity", 0.01))))
    x = torch.randn(4, 7)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), eager)
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_export_runs_each_layer_traced():
    model = fa_triton.models.mlp((7, 5, 3), ("relu", "identity"), backend="torch")
    x = torch.randn(4, 7)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.cuda
def test_cuda_graph_replays_the_chain():
    model = fa_triton.models.mlp((64, 32, 10), ("relu", "identity"), backend="triton", device="cuda")
    x = torch.randn(16, 64, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: plans and configs chosen outside the capture
            model.zero_grad(set_to_none=False)
            model(x).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        model(x).sum().backward()
    graph.replay()
    torch.cuda.synchronize()
    replayed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    for got, want in zip(replayed, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want)


@pytest.mark.cuda
def test_cuda_auto_chain_chooses_and_matches_the_kernels(fp32_matmul_precision):
    # backend="auto" on a narrow chain times the fused MLP against the chain step by step
    # (ops/backends/auto.py, ChainStep) and keeps a choice for both the forward and the backward;
    # whichever it keeps, the numbers are the kernels' within fp32 (tf32 dots) rounding.
    from fa_triton.ops import backends

    fp32_matmul_precision(True)
    backends.clear_auto_choices()
    torch.manual_seed(0)
    auto = fa_triton.models.mlp((64, 32, 16, 10), ("relu", "tanh", "identity"), backend="auto", device="cuda")
    triton = fa_triton.models.mlp((64, 32, 16, 10), ("relu", "tanh", "identity"), backend="triton", device="cuda")
    triton.load_state_dict(auto.state_dict())
    x = torch.randn(48, 64, device="cuda")
    results = []
    for model in (auto, triton):
        model(x).square().sum().backward()
        results.append([p.grad for p in model.parameters()])
    for chain_step in backends.auto.CHAIN_STEPS:
        assert list(chain_step.chosen.values()) in (["fused"], ["stepwise"]), chain_step.step
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)


def test_hooks_identity_taps_and_a_keyword_input_behave_as_in_nn_sequential():
    layers = _layers("fa", layers=((7, 5, "relu", 0.01), (5, 4, "tanh", 0.01), (4, 3, "identity", 0.01)))
    tap = nn.Identity()
    model = FASequential(layers[0], tap, layers[1], layers[2])
    x = torch.randn(2, 7, dtype=torch.float64)
    seen = []
    handle = tap.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    assert torch.equal(model(input=x), nn.Sequential(*model)(x)) and seen == [(2, 5), (2, 5)]
    assert "fused=[(2, 3)]" in repr(model) and "1 has hooks" in repr(model)
    handle.remove()
    assert "fused=[(0, 2, 3)]" in repr(model)  # the tap without hooks is skipped
    pre = []
    layers[1].register_full_backward_pre_hook(lambda module, grad: pre.append(1))
    model(x.requires_grad_(True)).sum().backward()
    assert pre == [1] and "fused=[]" in repr(model)


def test_a_backend_changed_after_construction_is_honoured():
    layers = _layers("fa", dtype=torch.float32)
    model = FASequential(*layers)
    layers[1].backend = "auto"
    assert "1 has backend='auto'" in repr(model)
    y = model(torch.randn(3, 7))
    assert "FASequentialFunction" in y.grad_fn.name()  # layers 2-5 still share "torch"


def test_forward_mode_is_refused_as_by_the_layers():
    model = FASequential(*_layers("fa"))
    x = torch.randn(2, 7, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
        torch.func.jvp(model, (x,), (x,))


def test_convert_keeps_the_sequential_itself_and_a_container_of_heads():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    model[1].eval()
    model.register_buffer("scale", torch.ones(1))
    model.tag = "mine"
    converted = fa_triton.convert(model, backend="torch", inplace=True)
    assert converted is model and type(model) is FASequential and model.tag == "mine"
    assert "scale" in model.state_dict() and not model[1].training and model.training
    assert "fused=[(3, 5)]" in repr(model)

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.Sequential(nn.Linear(8, 3), nn.Linear(8, 5))

        def forward(self, x):
            return [head(x) for head in self.heads]

    heads = fa_triton.convert(Heads(), backend="torch")
    assert type(heads.heads) is nn.Sequential  # widths that do not chain: no FASequential
    assert [tuple(y.shape) for y in heads(torch.randn(2, 8))] == [(2, 3), (2, 5)]


# ----------------------------------------------------- the chain's fast path (recorded fits)

def test_a_call_like_the_last_skips_the_checks_with_the_same_numbers(monkeypatch):
    import fa_triton.layers.sequential as sequential_module

    model = FASequential(*_layers("frsf"))
    x, grad_y = torch.randn(2, 3, 7, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    checked, _ = _run(model, x, grad_y)
    calls = []
    monkeypatch.setattr(sequential_module, "check_inputs", lambda *args, **kwargs: calls.append("check"))
    monkeypatch.setattr(sequential_module, "_fusable_now", lambda *args: calls.append("fusable"))
    fast, grad_fn = _run(model, x, grad_y)
    assert calls == [] and "FASequentialFunction" in grad_fn.name()
    for name, value in checked.items():
        assert torch.equal(fast[name], value), name


def test_after_a_fused_call_changed_tensors_and_inputs_are_checked_again():
    model = FASequential(*_layers("fa"))
    x = torch.randn(2, 7, dtype=torch.float64)
    model(x)
    with pytest.raises(TypeError, match="dtype torch.float64 but x has dtype torch.float32"):
        model(x.float())
    with pytest.raises(ValueError, match=r"in_features=7"):
        model(torch.randn(2, 6, dtype=torch.float64))
    model[2].weight = nn.Parameter(torch.randn(9, 2, dtype=torch.float64))  # no longer chains with layer 1
    with pytest.raises(ValueError, match=r"in_features=2.*got x of shape \(2, 1\)"):
        model(x)
    model = FASequential(*_layers("fa"))
    model(x)
    model.float()
    y = model(x.float())
    assert y.dtype == torch.float32 and "FASequentialFunction" in y.grad_fn.name()


def _names(launches) -> list[str]:
    return [name for name, _ in launches]


@pytest.mark.parametrize("method", ["fa", "usf", "brsf", "kp"])
def test_a_narrow_triton_chain_runs_fused(method, launches, fp32_matmul_precision):
    """Every width at most 128, no extra tensor (and fp32 with tf32 dots): the kernels' fused MLP
    (one launch for the forward, one for the backward's δ chain, one for the weight gradients),
    the same gradients as the layers one by one (the interpreter on the CPU)."""
    fp32_matmul_precision(True)
    sizes = ((50, 113, "relu", 0.01), (113, 9, "leaky_relu", 0.2), (9, 16, "sigmoid", 0.01), (16, 3, "identity", 0.01))
    layers = _layers(method, "triton", torch.float32, KERNEL_DEVICE, layers=sizes)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 50, generator=gen).to(KERNEL_DEVICE)
    grad_y = torch.randn(2, 5, 3, generator=gen).to(KERNEL_DEVICE)
    counters = _counters(layers)
    fused, grad_fn = _run(FASequential(*layers), x, grad_y)
    assert "FASequentialFunction" in grad_fn.name()
    seen = _names(launches)
    assert seen.count("mlp_forward_kernel") == 1 and "forward_kernel" not in seen
    # The backward: the δ chain, grad_b and grad_x in one launch (and one sum of grad_b's
    # partials), every grad_W in one grouped launch; no δ pass, chain step or per-layer GEMM.
    assert seen.count("mlp_backward_kernel") == 1 and seen.count("mlp_weight_grad_kernel") == 1
    assert not {"dfa_delta_kernel", "local_error_kernel", "backward_input_kernel", "backward_weight_kernel"} & set(seen)
    launches.clear()
    _restore(layers, counters)  # brsf: the same draws
    one_by_one, _ = _run(nn.Sequential(*layers), x, grad_y)
    seen = _names(launches)
    assert seen.count("forward_kernel") == 4 and "mlp_forward_kernel" not in seen
    for name, want in one_by_one.items():
        torch.testing.assert_close(fused[name], want, msg=lambda text, name=name: f"{name}: {text}")
    gelu = _layers(method, "triton", torch.float32, KERNEL_DEVICE, layers=((50, 9, "gelu", 0.01), (9, 3, "relu", 0.01)))
    launches.clear()
    FASequential(*gelu)(x)  # gelu keeps f'(z) besides y: layer by layer
    seen = _names(launches)
    assert "mlp_forward_kernel" not in seen and seen.count("forward_kernel") == 2
    fp32_matmul_precision(False)
    launches.clear()
    FASequential(*layers)(x)  # IEEE fp32 dots: layer by layer
    seen = _names(launches)
    assert "mlp_forward_kernel" not in seen and seen.count("forward_kernel") == 4


def test_a_long_batch_takes_each_layer_s_weight_gemm(monkeypatch, launches, fp32_matmul_precision):
    """Above tuning.MLP_GROUPED_MAX_ROWS rows the weight gradients are each layer's own GEMM
    (split over the batch); the δ chain stays fused; the same gradients as the layers one by one."""
    from fa_triton.kernels import tuning

    fp32_matmul_precision(True)
    monkeypatch.setattr(tuning, "MLP_GROUPED_MAX_ROWS", 16)
    layers = _layers("fa", "triton", torch.float32, KERNEL_DEVICE,
                     layers=((6, 5, "relu", 0.01), (5, 3, "tanh", 0.01), (3, 2, "identity", 0.01)))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(17, 6, generator=gen).to(KERNEL_DEVICE)
    grad_y = torch.randn(17, 2, generator=gen).to(KERNEL_DEVICE)
    fused, _ = _run(FASequential(*layers), x, grad_y)
    seen = _names(launches)
    assert seen.count("mlp_backward_kernel") == 1 and seen.count("backward_weight_kernel") == 3
    assert "mlp_weight_grad_kernel" not in seen
    one_by_one, _ = _run(nn.Sequential(*layers), x, grad_y)
    for name, want in one_by_one.items():
        torch.testing.assert_close(fused[name], want, msg=lambda text, name=name: f"{name}: {text}")


def test_a_parametrization_removed_again_leaves_no_stale_chain_fit():
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, weight):
            return 2 * weight

    layers = _layers("fa")
    model = FASequential(*layers)
    x = torch.randn(3, 7, dtype=torch.float64)
    model(x)
    parametrize.register_parametrization(layers[2], "weight", Double())
    doubled = model(x)
    parametrize.remove_parametrizations(layers[2], "weight", leave_parametrized=False)
    assert torch.equal(model(x), nn.Sequential(*layers)(x)) and not torch.equal(model(x), doubled)


@pytest.mark.parametrize("backend, dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_each_b_is_formed_once_when_the_chain_is_not_fused(backend, dtype, monkeypatch):
    """A chain the fused kernels do not take (the reference; IEEE fp32 on the kernels) forms each
    layer's B once, in its step: deciding whether to fuse forms none."""
    from fa_triton.ops.backends import get

    resolved = get(backend) if backend == "torch" else get("triton")
    formed = []
    original = resolved.feedback_matrix

    def counting(*args):
        formed.append(args[-1].method)
        return original(*args)

    monkeypatch.setattr(resolved, "feedback_matrix", counting)
    layers = _layers("usf", backend, dtype, KERNEL_DEVICE, layers=((6, 5, "relu", 0.01), (5, 4, "tanh", 0.01),
                                                                   (4, 3, "identity", 0.01)))
    x = torch.randn(7, 6, dtype=dtype, device=KERNEL_DEVICE)  # no gradient for x: B_1 is not needed
    FASequential(*layers)(x).sum().backward()
    assert formed == ["usf", "usf"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_copy_or_a_pickle_of_a_called_chain_runs_on_its_own_tensors(backend, tmp_path):
    # The chain's cached plan and fits (ids, resolved backends, the layers' kept plans) stay behind.
    import copy

    torch.manual_seed(0)
    model = FASequential(FALinear(4, 8, backend=backend), FALinear(8, 3, activation="identity", backend=backend))
    x = torch.randn(2, 4)
    for _ in range(3):
        model(x).sum().backward()
    torch.save(model, tmp_path / "model.pt")
    for clone in (copy.deepcopy(model), torch.load(tmp_path / "model.pt", weights_only=False)):
        with torch.no_grad():
            clone[1].weight.mul_(2)
        for _ in range(3):
            y = clone(x)
            first = torch.relu(x @ clone[0].weight.detach().t() + clone[0].bias.detach())
            torch.testing.assert_close(y.detach(), first @ clone[1].weight.detach().t() + clone[1].bias.detach())
            y.sum().backward()
        assert not torch.allclose(clone(x), model(x))
