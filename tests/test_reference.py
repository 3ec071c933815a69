"""The PyTorch reference (fa_triton/ops/backends/reference.py, fa_triton.reference) against the float64 oracle,
within the fixed bounds of fa_triton.testing (float64: 1e-12 relative; fp32, fp16, bf16: derived from rounding)."""

import pytest
import torch

import fa_triton
from fa_triton import ACTIVATIONS, reference
from fa_triton.rules.activations import activation_backward
from tests.oracle import (
    activation_and_derivative,
    assert_parity,
    assert_uses_feedback,
    layer_bounds,
    local_error,
    make_inputs,
    oracle,
    run_layer,
)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead_shape", [(), (13,), (3, 5)], ids=["1d", "2d", "3d"])
def test_float64_matches_oracle(activation, bias, lead_shape):
    x, weight, b, feedback, grad_y = make_inputs(lead_shape, 19, 11, torch.float64, "cpu", bias=bias,
                                                 activation=activation)
    expected = oracle(x, weight, b, feedback, grad_y, activation)
    result = run_layer(reference, x, weight, b, feedback, grad_y, activation)
    assert_parity(result, expected, torch.float64, name="reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(33, 45, 70), (64, 784, 128), (3, 1, 5)], ids=lambda s: "x".join(map(str, s)))
def test_low_precision_within_the_fixed_bounds(shape, activation, dtype):
    # The reference is what the kernels are compared with: it is held to the oracle itself, in
    # every dtype it runs in on the CPU, by the bounds derived from rounding (never by its own error).
    M, in_features, out_features = shape
    x, weight, b, feedback, grad_y = make_inputs((M,), in_features, out_features, dtype, "cpu", activation=activation)
    expected = oracle(x, weight, b, feedback, grad_y, activation)
    bounds = layer_bounds(x, weight, b, feedback, grad_y, activation, dtype=dtype)
    assert_parity(run_layer(reference, x, weight, b, feedback, grad_y, activation), expected, dtype, bounds=bounds,
                  name="reference")


@pytest.mark.parametrize("negative_slope", [0.0, 0.2, -0.3])
def test_leaky_relu_slopes(negative_slope):
    x, weight, b, feedback, grad_y = make_inputs((29,), 8, 6, torch.float64, "cpu", activation="leaky_relu")
    expected = oracle(x, weight, b, feedback, grad_y, "leaky_relu", negative_slope)
    result = run_layer(reference, x, weight, b, feedback, grad_y, "leaky_relu", negative_slope=negative_slope)
    assert_parity(result, expected, torch.float64, name=f"reference, slope {negative_slope}")


def test_uses_feedback_not_weight():
    x, weight, b, feedback, grad_y = make_inputs((4,), 5, 3, torch.float64, "cpu")
    result = run_layer(reference, x, weight, b, feedback, grad_y, "identity")
    delta = local_error(x, weight, b, grad_y, "identity")[1]
    assert_uses_feedback(result["grad_x"], delta, feedback, weight)


def test_saves_only_what_backward_needs():
    # A frozen weight needs no x in backward; a leaf input needs no feedback.
    x, weight, b, feedback, _ = make_inputs((4,), 5, 3, torch.float64, "cpu")
    y = reference(x.requires_grad_(True), weight, b, feedback, "relu")
    saved = [t for t in (y.grad_fn.saved_tensors) if t is not None]
    assert not any(t is x for t in saved) and any(t is feedback for t in saved)
    weight.requires_grad_(True)
    y = reference(x.detach(), weight, None, feedback, "identity")
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    assert len(saved) == 1 and saved[0].data_ptr() == x.data_ptr()


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_relu_backward_is_pytorchs_on_special_values(dtype):
    # z takes 0, ±finite, ±inf and NaN; every kind of upstream gradient meets each.
    z_values = torch.tensor([0.0, 1.5, -1.5, INF, -INF, NAN], dtype=dtype)
    grad_values = torch.tensor([1.0, -2.0, INF, -INF, NAN, 0.0], dtype=dtype)
    z = z_values.repeat_interleave(len(grad_values)).reshape(len(z_values), -1).requires_grad_(True)
    grad_y = grad_values.repeat(len(z_values)).reshape(len(z_values), -1)
    torch.relu(z).backward(grad_y)
    delta = activation_backward(grad_y, torch.relu(z.detach()), "relu", 0.0)
    torch.testing.assert_close(delta, z.grad, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "identity", "leaky_relu"])
def test_bias_only_backward_against_the_equations(activation):
    # Frozen weight, trainable bias (and x): grad_b = Σ_rows g ⊙ f'(z) and grad_x = δ B exactly,
    # from the equations in float64 (the bias-only path is its own in the backward).
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(9, 7, generator=gen, dtype=torch.float64)
    weight = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    feedback = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    bias = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    fa_triton.fa_linear(x, weight, bias, feedback, activation, backend="torch").backward(grad_y)
    z = x @ weight.t() + bias.detach()
    delta = grad_y * activation_and_derivative(z, activation, 0.01)[1]
    assert_parity(bias.grad, delta.sum(0), torch.float64, name="grad_bias")
    x_leaf = x.clone().requires_grad_(True)
    bias.grad = None
    fa_triton.fa_linear(x_leaf, weight, bias, feedback, activation, backend="torch").backward(grad_y)
    assert_parity(bias.grad, delta.sum(0), torch.float64, name="grad_bias (with x)")
    assert_parity(x_leaf.grad, delta @ feedback, torch.float64, name="grad_x")
