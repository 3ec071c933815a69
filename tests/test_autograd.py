"""fa_triton/ops/autograd.py under torch.func transforms: the layers' aten-op form
(``transformable``) that vmap and grad run, so PyTorch's model-ensembling recipe
(``stack_module_state`` + ``vmap`` over ``functional_call``) trains many seeds in one pass.
Each member's gradients are held to its own separate run in float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

import fa_triton
from fa_triton import FAConv2d
from tests.oracle import assert_parity

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
