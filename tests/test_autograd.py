"""fa_triton/ops/autograd.py under torch.func transforms: the layers' aten-op form
(``transformable``) that vmap and grad run, so PyTorch's model-ensembling recipe
(``stack_module_state`` + ``vmap`` over ``functional_call``) trains many seeds in one pass.
Each member's gradients are held to its own separate run in float64. On backend="triton" a
vmap (with plain autograd outside it) runs the kernels' stacked ops instead (the vmap rule of
``fa_triton.ops.library``): one launch per job for every member, each member held to its own
separate run within fp32 rounding."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

import fa_triton
from fa_triton import FAConv2d
from tests.oracle import assert_parity, layer_bounds, oracle, oracle_feedback

SEEDS = 3


def _mlps(method):
    models = []
    for seed in range(SEEDS):
        torch.manual_seed(seed)
        models.append(fa_triton.models.mlp((7, 6, 5, 3), ("relu", "tanh", "identity"), method=method,
                                           backend="torch", dtype=torch.float64))
    return models


def _separate_grads(models, xs, targets):
    grads = []
    for model, x, target in zip(models, xs, targets):
        model = copy.deepcopy(model)  # its own counters and gradients
        F.cross_entropy(model(x), target).backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    return grads


def _ensemble_grads(models, xs, targets):
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def loss(params, buffers, x, target):
        return F.cross_entropy(functional_call(base, (params, buffers), (x,)), target)

    return vmap(grad(loss))(params, buffers, xs, targets)


@pytest.mark.parametrize("method", [m for m in fa_triton.METHODS if m != "brsf"])
def test_vmap_over_stacked_models_equals_each_separate_run(method):
    models = _mlps(method)
    gen = torch.Generator().manual_seed(5)
    xs = torch.randn(SEEDS, 4, 7, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 3, (SEEDS, 4), generator=gen)
    together = _ensemble_grads(models, xs, targets)
    for member, separate in enumerate(_separate_grads(models, xs, targets)):
        assert set(together) == set(separate)
        for name, want in separate.items():
            assert_parity(together[name][member], want, torch.float64, name=f"member {member} {name}")


@pytest.mark.parametrize("method", ["fa", "frsf", "kp"])
def test_vmap_over_stacked_models_batches_each_matmul(method):
    # One batched matmul per GEMM of the FA step, over all members at once, no per-member loop:
    # per layer x Wᵀ and the aten-op form's x Bᵀ (its value cancels; its backward is δ B), δ B
    # for the 2 layers above the first (the input needs no gradient) and δᵀ x for the 3 weights.
    from torch.profiler import profile

    models = _mlps(method)
    xs = torch.randn(SEEDS, 4, 7, dtype=torch.float64)
    targets = torch.zeros(SEEDS, 4, dtype=torch.int64)
    with profile(record_shapes=True) as prof:
        _ensemble_grads(models, xs, targets)
    batched = [e.input_shapes for e in prof.events() if e.name in ("aten::bmm", "aten::baddbmm")]
    # kp: B trains, and its gradient (W's, δᵀ x) comes once more through the x Bᵀ term.
    assert len(batched) == 3 + 3 + 2 + 3 + (3 if method == "kp" else 0), batched
    assert all(shapes[0][0] == SEEDS for shapes in batched), batched


def test_vmap_over_stacked_conv_models():
    models = []
    for seed in range(SEEDS):
        torch.manual_seed(seed)
        models.append(nn.Sequential(FAConv2d(2, 3, 3, padding=1, activation="relu", method="kp", dtype=torch.float64),
                                    nn.Flatten(), fa_triton.FALinear(3 * 5 * 5, 4, activation="identity",
                                                                     dtype=torch.float64)))
    gen = torch.Generator().manual_seed(6)
    xs = torch.randn(SEEDS, 2, 2, 5, 5, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 4, (SEEDS, 2), generator=gen)
    together = _ensemble_grads(models, xs, targets)
    for member, separate in enumerate(_separate_grads(models, xs, targets)):
        for name, want in separate.items():
            assert_parity(together[name][member], want, torch.float64, name=f"member {member} {name}")


def test_brsf_refuses_stacked_models_but_runs_under_grad():
    models = _mlps("brsf")
    xs = torch.randn(SEEDS, 4, 7, dtype=torch.float64)
    targets = torch.zeros(SEEDS, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="method='brsf' under torch.func.vmap over stacked models"):
        _ensemble_grads(models, xs, targets)
    model = models[0]
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    start = {name: b.clone() for name, b in buffers.items()}
    grads = grad(lambda p, b: F.cross_entropy(functional_call(model, (p, b), (xs[0],)), targets[0]))(params, buffers)
    for name, b in buffers.items():  # the draw happened, as in an eager training step
        if name.endswith("counter"):
            assert b.item() == start[name].item() + 1
            b.copy_(start[name])
    separate = _separate_grads([model], xs[:1], targets[:1])[0]
    for name, want in separate.items():
        assert_parity(grads[name], want, torch.float64, name=name)


# ------------------------------------------------------------ the kernels' stacked launches

def _triton_mlps(method, device):
    models = []
    for seed in range(SEEDS):
        torch.manual_seed(seed)
        models.append(fa_triton.models.mlp((7, 6, 5, 3), ("relu", "tanh", "identity"), method=method,
                                           backend="triton").to(device))
    return models


def _stacked_loss_grads(models, xs, targets):
    """PyTorch's ensembling recipe with plain autograd outside the vmap: (each member's loss,
    each parameter's gradient [members, ...])."""
    params, buffers = stack_module_state(models)
    params = {name: p.detach().requires_grad_() for name, p in params.items()}
    base = copy.deepcopy(models[0]).to("meta")
    losses = vmap(lambda p, b, x, t: F.cross_entropy(functional_call(base, (p, b), (x,)), t))(params, buffers, xs,
                                                                                                targets)
    losses.sum().backward()
    return losses, {name: p.grad for name, p in params.items()}


@pytest.mark.parametrize("method", [m for m in fa_triton.METHODS if m != "brsf"])
def test_vmap_on_triton_is_one_stacked_launch_per_job(method, kernel_device, launches):
    models = _triton_mlps(method, kernel_device)
    gen = torch.Generator().manual_seed(5)
    xs = torch.randn(SEEDS, 4, 7, generator=gen).to(kernel_device)
    targets = torch.randint(0, 3, (SEEDS, 4), generator=gen).to(kernel_device)
    losses, together = _stacked_loss_grads(models, xs, targets)
    gemms = [(name, grid) for name, grid in launches
             if name.endswith(("forward_kernel", "input_kernel", "weight_kernel"))]
    # 3 forwards, δ B for the 2 layers above the first (the data needs no gradient), 3 δᵀ x: each
    # one launch whose grid's third axis is the members.
    assert sorted(name for name, _ in gemms) == sorted(["forward_kernel"] * 3 + ["backward_input_kernel"] * 2
                                                       + ["backward_weight_kernel"] * 3), launches
    assert all(len(grid) == 3 and grid[2] == SEEDS for _, grid in launches), launches
    for member, separate in enumerate(_separate_grads(models, xs, targets)):
        assert set(together) == set(separate)
        for name, want in separate.items():
            torch.testing.assert_close(together[name][member], want, rtol=1e-5, atol=1e-6,
                                       msg=lambda text, where=f"{method} member {member} {name}": f"{where}: {text}")


def test_vmap_on_triton_layer_matches_the_oracle_per_member(kernel_device):
    # One FALinear per member (frsf: B from R and W's sign, in the kernel), against the float64
    # oracle of the member's own layer within the fp32 bounds.
    layers = []
    for seed in range(SEEDS):
        torch.manual_seed(seed)
        layers.append(fa_triton.FALinear(17, 13, activation="tanh", method="frsf", backend="triton").to(kernel_device))
    gen = torch.Generator().manual_seed(9)
    xs = torch.randn(SEEDS, 5, 17, generator=gen).to(kernel_device).requires_grad_(True)
    grad_y = torch.randn(SEEDS, 5, 13, generator=gen).to(kernel_device)
    params, buffers = stack_module_state(layers)
    params = {name: p.detach().requires_grad_() for name, p in params.items()}
    base = copy.deepcopy(layers[0]).to("meta")
    y = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)))(params, buffers, xs)
    y.backward(grad_y)
    for member, layer in enumerate(layers):
        B = oracle_feedback("frsf", layer.weight, layer.feedback)
        expected = oracle(xs[member], layer.weight, layer.bias, B, grad_y[member], "tanh")
        bounds = layer_bounds(xs[member], layer.weight, layer.bias, B, grad_y[member], "tanh", dtype=torch.float32,
                              method="frsf")
        result = {"y": y[member], "grad_x": xs.grad[member], "grad_weight": params["weight"].grad[member],
                  "grad_bias": params["bias"].grad[member]}
        assert_parity(result, expected, torch.float32, bounds=bounds, name=f"member {member}")


def test_vmap_on_triton_over_the_data_alone_shares_the_layer(kernel_device, launches):
    # Parameters not stacked (vmap over x only): the members' rows are one flattened batch, so
    # the layer's own single-model launch runs once on them (no model axis), brsf's one draw
    # included, and every gradient is the flattened batch's (grad_x through the one R).
    torch.manual_seed(0)
    layer = fa_triton.FALinear(7, 5, activation="relu", method="brsf", backend="triton").to(kernel_device)
    twin = copy.deepcopy(layer)
    xs = torch.randn(SEEDS, 4, 7, device=kernel_device).requires_grad_(True)
    flat = xs.detach().reshape(-1, 7).requires_grad_(True)
    vmap(layer)(xs).square().sum().backward()
    assert [name for name, _ in launches].count("forward_kernel") == 1, launches
    assert all(len(grid) < 3 or grid[2] == 1 for _, grid in launches), launches
    twin(flat).square().sum().backward()
    assert torch.equal(layer.counter, twin.counter)
    torch.testing.assert_close(xs.grad, flat.grad.view(SEEDS, 4, 7), rtol=1e-5, atol=1e-6)
    for (name, got), want in zip(layer.named_parameters(), twin.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5,
                                   msg=lambda text, name=name: f"{name}: {text}")


def test_vmap_on_triton_over_stacked_kp_models_gives_each_parameter_its_own_gradient(kernel_device):
    # kp's B gradient is W's: after two backward passes (no zero_grad) each is twice one pass's,
    # in storages of their own (a shared one would have grown threefold, or been clipped
    # together). The members are the parameters' last axis (in_dims=-1): each gradient then
    # reaches its parameter through a view with the parameter's own strides, which autograd
    # keeps as the .grad without a copy.
    models = _triton_mlps("kp", kernel_device)
    xs = torch.randn(SEEDS, 4, 7, device=kernel_device)
    targets = torch.zeros(SEEDS, 4, dtype=torch.int64, device=kernel_device)
    params, buffers = stack_module_state(models)
    params = {name: p.detach().movedim(0, -1).requires_grad_() for name, p in params.items()}
    base = copy.deepcopy(models[0]).to("meta")

    def step():
        vmap(lambda p, b, x, t: F.cross_entropy(functional_call(base, (p, b), (x,)), t), in_dims=(-1, 0, 0, 0))(
            params, buffers, xs, targets).sum().backward()

    step()
    once = {name: p.grad.clone() for name, p in params.items()}
    step()
    for name, p in params.items():
        torch.testing.assert_close(p.grad, 2 * once[name], rtol=1e-6, atol=1e-7, msg=lambda text, name=name: name)
    pairs = [(name, name.replace("weight", "feedback")) for name in params if name.endswith("weight")]
    assert pairs and all(feedback in params for _, feedback in pairs)
    for weight, feedback in pairs:
        assert params[weight].grad.untyped_storage().data_ptr() != params[feedback].grad.untyped_storage().data_ptr()


def test_nested_vmaps_on_triton_run_the_aten_form_without_a_fallback(kernel_device, launches):
    # A vmap inside a vmap: the stacked ops have no vmap rule, so the layer takes its aten form
    # (no kernel launch, no per-slice fallback warning), with the flattened batch's values.
    torch.manual_seed(0)
    layer = fa_triton.FALinear(7, 5, activation="tanh", method="frsf", backend="triton").to(kernel_device)
    xs = torch.randn(2, 3, 4, 7, device=kernel_device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = vmap(vmap(layer))(xs)
    assert launches == []
    torch.testing.assert_close(y, layer(xs.reshape(-1, 7)).view(2, 3, 4, 5), rtol=1e-5, atol=1e-6)


def test_vmap_on_triton_refuses_stacked_brsf(kernel_device):
    models = _triton_mlps("brsf", kernel_device)
    xs = torch.randn(SEEDS, 4, 7, device=kernel_device)
    targets = torch.zeros(SEEDS, 4, dtype=torch.int64, device=kernel_device)
    with pytest.raises(ValueError, match="method='brsf' under torch.func.vmap over stacked models"):
        _stacked_loss_grads(models, xs, targets)


# ------------------------------------------------------------- torch.compile of a vmapped step

def _vmapped_loss(models):
    base = copy.deepcopy(models[0]).to("meta")
    return vmap(lambda p, b, x, t: F.cross_entropy(functional_call(base, (p, b), (x,)), t))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_vmap_over_stacked_models_equals_eager(backend, kernel_device, launches):
    # torch.compile(fullgraph=True) of the ensembling recipe's vmapped loss: the transform checks
    # are evaluated while tracing, so the graph holds what eager runs (the stacked ops on
    # triton, the aten form on the reference); losses and kp's gradients as eager's.
    models = _triton_mlps("kp", kernel_device) if backend == "triton" else _mlps("kp")
    dtype = next(models[0].parameters()).dtype
    gen = torch.Generator().manual_seed(3)
    xs = torch.randn(SEEDS, 4, 7, generator=gen, dtype=dtype).to(kernel_device if backend == "triton" else "cpu")
    targets = torch.randint(0, 3, (SEEDS, 4), generator=gen).to(xs.device)
    runs = []
    for compiled in (False, True):
        params, buffers = stack_module_state(models)
        params = {name: p.detach().requires_grad_() for name, p in params.items()}
        loss = _vmapped_loss(models)
        launches.clear()
        losses = (torch.compile(loss, fullgraph=True) if compiled else loss)(params, buffers, xs, targets)
        losses.sum().backward()
        runs.append((losses.detach(), {name: p.grad for name, p in params.items()}))
        # Compiled as eager: the three layers' stacked forwards (the members on the grid's third
        # axis) on the kernels, no kernel on the reference.
        forwards = [grid for name, grid in launches if name == "forward_kernel"]
        assert forwards == ([] if backend == "torch" else [forwards[0]] * 3) and all(
            len(grid) == 3 and grid[2] == SEEDS for grid in forwards), (compiled, launches)
    (eager_losses, eager), (compiled_losses, compiled) = runs
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-6, atol=1e-7)
    for name, want in eager.items():
        torch.testing.assert_close(compiled[name], want, rtol=1e-5, atol=1e-7, msg=lambda text, name=name: name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vmap_refuses_stacked_brsf_before_any_draw(backend, kernel_device):
    # The draw itself refuses (fa_triton::next_draw's vmap rule): no member's counter has moved.
    models = _triton_mlps("brsf", kernel_device) if backend == "triton" else _mlps("brsf")
    params, buffers = stack_module_state(models)
    dtype = next(models[0].parameters()).dtype
    xs = torch.randn(SEEDS, 4, 7, dtype=dtype, device=buffers["0.counter"].device)
    targets = torch.zeros(SEEDS, 4, dtype=torch.int64, device=xs.device)
    start = {name: b.clone() for name, b in buffers.items()}
    with pytest.raises(ValueError, match="stack_module_state cannot stack"):
        _vmapped_loss(models)(params, buffers, xs, targets)
    assert all(torch.equal(b, start[name]) for name, b in buffers.items())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_brsf_draws_once_under_functionalize_and_not_under_forward_mode(backend, kernel_device):
    # functionalize takes no custom op that mutates its input: the draw stays two plain ops
    # there (one draw per call); forward mode is refused before the draw (the counter unmoved).
    torch.manual_seed(0)
    layer = fa_triton.FALinear(7, 5, activation="tanh", method="brsf", backend=backend)
    layer = layer.to(kernel_device if backend == "triton" else "cpu")
    x = torch.randn(4, 7, device=layer.weight.device)
    y = torch.func.functionalize(layer)(x)
    assert layer.counter.item() == 1
    torch.testing.assert_close(y, copy.deepcopy(layer).eval()(x))  # (eval: no draw; y does not read R)
    with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
        torch.func.jvp(layer, (x,), (torch.ones_like(x),))
    assert layer.counter.item() == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_vmap_over_the_data_alone_runs_brsf(backend, kernel_device):
    # One brsf layer for every member (fullgraph): one draw, the flattened batch's values.
    torch.manual_seed(0)
    layer = fa_triton.FALinear(7, 5, activation="relu", method="brsf", backend=backend,
                               dtype=torch.float64 if backend == "torch" else torch.float32)
    layer = layer.to(kernel_device if backend == "triton" else "cpu")
    twin = copy.deepcopy(layer)
    xs = torch.randn(SEEDS, 4, 7, dtype=layer.weight.dtype, device=layer.weight.device)
    torch.compile(vmap(layer), fullgraph=True)(xs).square().sum().backward()
    twin(xs.reshape(-1, 7)).square().sum().backward()
    assert torch.equal(layer.counter, twin.counter) and layer.counter.item() == 1
    for (name, got), want in zip(layer.named_parameters(), twin.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6, msg=lambda text, name=name: name)


def test_compiled_vmap_refuses_stacked_brsf():
    # Traced, the draw (fa_triton::next_draw) meets the batched counters first: the same refusal.
    models = _mlps("brsf")
    params, buffers = stack_module_state(models)
    xs = torch.randn(SEEDS, 4, 7, dtype=torch.float64)
    targets = torch.zeros(SEEDS, 4, dtype=torch.int64)
    with pytest.raises(Exception, match="stack_module_state cannot stack"):
        torch.compile(_vmapped_loss(models), fullgraph=True)(params, buffers, xs, targets)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backward_is_once_differentiable(backend, kernel_device):
    # fa_backward checks grad mode itself (no wrapper): with create_graph=True the gradients are
    # the plain backward's, and differentiating them again is an error, not FA's backward
    # differentiated as if it were a gradient. x of 3 dimensions: flattened and given back.
    torch.manual_seed(0)
    device = kernel_device if backend == "triton" else "cpu"
    layer = fa_triton.FALinear(7, 5, backend=backend, device=device)
    x = torch.randn(2, 3, 7, device=device, requires_grad=True)
    (plain,) = torch.autograd.grad(layer(x).square().sum(), x)
    (graphed,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)  # g = 2y needs grad
    assert graphed.shape == x.shape and graphed.requires_grad
    torch.testing.assert_close(graphed, plain, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        graphed.sum().backward()
