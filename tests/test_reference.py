"""The PyTorch reference (fa_triton/ops/backends/reference.py, fa_triton.reference) against the float64 oracle."""

import pytest
import torch

import fa_triton
from fa_triton import ACTIVATIONS, reference
from fa_triton.rules.activations import activation_backward
from tests.oracle import make_inputs, max_error, oracle, run_layer


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead_shape", [(), (13,), (3, 5)], ids=["1d", "2d", "3d"])
def test_float64_matches_oracle(activation, bias, lead_shape):
    x, weight, b, feedback, grad_y = make_inputs(lead_shape, 19, 11, torch.float64, "cpu", bias=bias,
                                                 activation=activation)
    expected = oracle(x, weight, b, feedback, grad_y, activation)
    result = run_layer(reference, x, weight, b, feedback, grad_y, activation)
    for name, value in expected.items():
        if value is None:
            assert result[name] is None
        else:
            assert max_error(result[name], value) < 1e-12, name


@pytest.mark.parametrize("negative_slope", [0.0, 0.2, -0.3])
def test_leaky_relu_slopes(negative_slope):
    x, weight, b, feedback, grad_y = make_inputs((29,), 8, 6, torch.float64, "cpu", activation="leaky_relu")
    expected = oracle(x, weight, b, feedback, grad_y, "leaky_relu", negative_slope)
    result = run_layer(reference, x, weight, b, feedback, grad_y, "leaky_relu", negative_slope=negative_slope)
    for name, value in expected.items():
        assert max_error(result[name], value) < 1e-12, name


def test_uses_feedback_not_weight():
    x, weight, b, feedback, grad_y = make_inputs((4,), 5, 3, torch.float64, "cpu")
    result = run_layer(reference, x, weight, b, feedback, grad_y, "identity")
    torch.testing.assert_close(result["grad_x"], grad_y @ feedback)
    assert not torch.allclose(result["grad_x"], grad_y @ weight)


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
    from tests.oracle import activation_and_derivative

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(9, 7, generator=gen, dtype=torch.float64)
    weight = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    feedback = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    bias = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    fa_triton.fa_linear(x, weight, bias, feedback, activation, backend="torch").backward(grad_y)
    z = x @ weight.t() + bias.detach()
    delta = grad_y * activation_and_derivative(z, activation, 0.01)[1]
    torch.testing.assert_close(bias.grad, delta.sum(0), rtol=0, atol=1e-12)
    x_leaf = x.clone().requires_grad_(True)
    bias.grad = None
    fa_triton.fa_linear(x_leaf, weight, bias, feedback, activation, backend="torch").backward(grad_y)
    torch.testing.assert_close(bias.grad, delta.sum(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(x_leaf.grad, delta @ feedback, rtol=0, atol=1e-12)
