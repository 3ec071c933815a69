"""Alignment metrics: angles between W and B, and between FA's and backprop's weight gradients."""


import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fa_triton import FALinear
from fa_triton.metrics import angle_between, fa_layers, gradient_alignment, weight_alignment


def test_angle_between_known_angles():
    a = torch.tensor([1.0, 0.0, 0.0])
    assert angle_between(a, a) == pytest.approx(0.0, abs=1e-6)
    assert angle_between(a, 3 * a) == pytest.approx(0.0, abs=1e-6)
    assert angle_between(a, -a) == pytest.approx(180.0)
    assert angle_between(a, torch.tensor([0.0, 2.0, 0.0])) == pytest.approx(90.0)
    assert angle_between(a, torch.tensor([1.0, 1.0, 0.0])) == pytest.approx(45.0)
    # Matrices are flattened.
    assert angle_between(torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])) == pytest.approx(90.0)


def test_angle_between_zero_and_bad_shapes():
    assert angle_between(torch.zeros(3), torch.ones(3)) == 90.0
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(3, 2\)"):
        angle_between(torch.ones(2, 3), torch.ones(3, 2))


def test_weight_alignment():
    torch.manual_seed(0)
    layer = FALinear(300, 200)
    # Independent draws in 60000 dimensions: nearly orthogonal.
    angle, ratio = weight_alignment(layer)
    assert abs(angle - 90.0) < 1.0
    assert ratio == pytest.approx(1.0, rel=0.05)  # same distribution, U(±1/√in)
    with torch.no_grad():
        layer.feedback.copy_(layer.weight)
    assert weight_alignment(layer).angle == pytest.approx(0.0, abs=1e-3)
    with torch.no_grad():
        layer.feedback.copy_(-2 * layer.weight)
    result = weight_alignment(layer)
    assert result.angle == pytest.approx(180.0, abs=1e-3)
    assert result.norm_ratio == pytest.approx(0.5)


def test_weight_alignment_rejects_other_modules():
    with pytest.raises(TypeError, match="Linear"):
        weight_alignment(nn.Linear(3, 2))


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        FALinear(20, 16, activation="relu"), FALinear(16, 12, activation="tanh"), FALinear(12, 5, activation="identity")
    ).double()


def _batch():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 20, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 5, (32,), generator=generator)


def test_gradient_alignment_matches_explicit_backprop():
    model = _mlp()
    x, y = _batch()
    angles = gradient_alignment(model, x, y, F.cross_entropy)

    # The true gradient, from an ordinary nn.Linear network with the same weights.
    layers = fa_layers(model)
    linears = [nn.Linear(layer.in_features, layer.out_features).double() for layer in layers]
    with torch.no_grad():
        for linear, layer in zip(linears, layers):
            linear.weight.copy_(layer.weight)
            linear.bias.copy_(layer.bias)
    h = torch.relu(linears[0](x))
    h = torch.tanh(linears[1](h))
    F.cross_entropy(linears[2](h), y).backward()
    # The FA gradient, by backward() through the FA layers.
    F.cross_entropy(model(x), y).backward()
    expected = [angle_between(layer.weight.grad, linear.weight.grad) for layer, linear in zip(layers, linears)]

    assert angles == pytest.approx(expected, abs=1e-6)
    assert angles[-1] == pytest.approx(0.0, abs=1e-4)  # the last layer's grad_W uses no feedback
    assert all(5.0 < a < 175.0 for a in angles[:-1])  # random feedback: a real angle


def test_gradient_alignment_is_zero_when_feedback_is_weight():
    model = _mlp()
    with torch.no_grad():
        for layer in fa_layers(model):
            layer.feedback.copy_(layer.weight)
    x, y = _batch()
    assert gradient_alignment(model, x, y, F.cross_entropy) == pytest.approx([0.0, 0.0, 0.0], abs=1e-4)


def test_gradient_alignment_leaves_the_model_as_it_was():
    model = _mlp()
    x, y = _batch()
    layers = fa_layers(model)
    feedback_before = [layer.feedback for layer in layers]
    values_before = [f.clone() for f in feedback_before]
    layers[0].weight.grad = torch.full_like(layers[0].weight, 7.0)
    gradient_alignment(model, x, y, F.cross_entropy)
    for layer, tensor, values in zip(layers, feedback_before, values_before):
        assert layer.feedback is tensor
        assert torch.equal(layer.feedback, values)
        assert "feedback" in dict(layer.named_buffers())
    assert torch.equal(layers[0].weight.grad, torch.full_like(layers[0].weight, 7.0))
    assert layers[1].weight.grad is None and layers[0].bias.grad is None


def test_gradient_alignment_needs_fa_layers():
    with pytest.raises(ValueError, match="no FALinear"):
        gradient_alignment(nn.Sequential(nn.Linear(3, 2)), torch.ones(1, 3), torch.zeros(1, dtype=torch.long),
                           F.cross_entropy)


def test_fa_layers_order():
    model = _mlp()
    assert [layer.out_features for layer in fa_layers(model)] == [16, 12, 5]
    assert fa_layers(nn.Sequential(nn.ReLU())) == []


def test_gradient_alignment_of_a_frozen_layer_is_nan():
    torch.manual_seed(0)
    model = nn.Sequential(FALinear(6, 5), FALinear(5, 4), FALinear(4, 3, activation="identity"))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    angles = gradient_alignment(model, x, y, F.cross_entropy)
    model[1].weight.requires_grad_(False)
    frozen = gradient_alignment(model, x, y, F.cross_entropy)
    assert math.isnan(frozen[1]) and frozen[0] == pytest.approx(angles[0]) and frozen[2] == pytest.approx(angles[2])
    for layer in model:
        layer.weight.requires_grad_(False)
    assert all(math.isnan(angle) for angle in gradient_alignment(model, x, y, F.cross_entropy))
