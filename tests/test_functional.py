"""fa_linear (fa_triton/functional.py): backends, exactness against backprop, edge cases."""

import pytest
import torch
import torch.nn.functional as F

from fa_triton import ACTIVATIONS, fa_linear
from fa_triton.rules.activations import apply_activation
from tests.helpers import KERNEL_DEVICE
from tests.oracle import assert_parity, assert_uses_feedback, layer_bounds, local_error, make_inputs, oracle, run_layer


def backprop_layer(x, weight, bias, feedback, activation, negative_slope=0.01):
    """Ordinary autograd through act(F.linear(x, W, b)): what FA with B = W must reproduce."""
    return apply_activation(F.linear(x, weight, bias), activation, negative_slope)


# (backend, device, dtype): FA with B = W and autograd's backprop are both held to the float64
# oracle of backprop (B = W) within the fixed bounds (float64: 1e-12 relative; float32: derived
# from rounding, whatever the summation order of the kernels, cuBLAS or MKL).
EXACTNESS_CASES = [
    ("torch", "cpu", torch.float64),
    ("torch", "cpu", torch.float32),
    ("triton", KERNEL_DEVICE, torch.float32),
]


@pytest.mark.parametrize("backend, device, dtype", EXACTNESS_CASES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_feedback_equal_to_weight_is_backprop(backend, device, dtype, activation):
    x, weight, b, _, grad_y = make_inputs((2, 9), 31, 17, dtype, device, activation=activation)
    fa = run_layer(fa_linear, x, weight, b, weight.clone(), grad_y, activation, backend=backend)
    bp = run_layer(backprop_layer, x, weight, b, None, grad_y, activation)
    expected = oracle(x, weight, b, weight, grad_y, activation)  # backprop's equations: B = W
    bounds = None if dtype == torch.float64 else layer_bounds(x, weight, b, weight, grad_y, activation, dtype=dtype)
    assert_parity(bp, expected, dtype, bounds=bounds, name="autograd backprop")
    assert_parity(fa, expected, dtype, bounds=bounds, name=f"fa_linear with B = W ({backend})")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_feedback_different_from_weight_is_not_backprop(backend):
    device = "cpu" if backend == "torch" else KERNEL_DEVICE
    x, weight, b, feedback, grad_y = make_inputs((8,), 12, 6, torch.float32, device, activation="identity")
    fa = run_layer(fa_linear, x, weight, b, feedback, grad_y, "identity", backend=backend)
    bp = run_layer(backprop_layer, x, weight, b, None, grad_y, "identity")
    bounds = layer_bounds(x, weight, b, feedback, grad_y, "identity")
    # grad_x is δ·B within its bound, and not backprop's δ·W.
    delta = local_error(x, weight, b, grad_y, "identity")[1]
    assert_uses_feedback(fa["grad_x"], delta, feedback, weight, bound=bounds["grad_x"])
    # Only grad_x changes: the weight and bias updates are backprop's own (the oracle's, for both).
    expected = oracle(x, weight, b, feedback, grad_y, "identity")
    for name, result in (("fa", fa), ("backprop", bp)):
        assert_parity({key: result[key] for key in ("grad_weight", "grad_bias")},
                      {key: expected[key] for key in ("grad_weight", "grad_bias")}, torch.float32, bounds=bounds,
                      name=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("lead_shape", [(0,), (3, 0)], ids=["2d", "3d"])
def test_empty_batch(backend, lead_shape):
    device = "cpu" if backend == "torch" else KERNEL_DEVICE
    x, weight, b, feedback, grad_y = make_inputs(lead_shape, 7, 5, torch.float32, device)
    result = run_layer(fa_linear, x, weight, b, feedback, grad_y, "relu", backend=backend)
    assert result["y"].shape == (*lead_shape, 5)
    assert result["grad_x"].shape == x.shape
    assert torch.equal(result["grad_weight"], torch.zeros_like(weight))
    assert torch.equal(result["grad_bias"], torch.zeros_like(b))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("activation", ["relu", "identity", "tanh"])
def test_nan_and_inf_propagate_like_pytorch(backend, activation):
    # With feedback = weight every output must be backprop's, special values included.
    device = "cpu" if backend == "torch" else KERNEL_DEVICE
    x, weight, b, _, grad_y = make_inputs((6,), 8, 4, torch.float32, device, activation=activation)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    x[4, 5] = -float("inf")
    grad_y[5, 2] = float("inf")
    grad_y[0, 1] = float("nan")
    fa = run_layer(fa_linear, x, weight, b, weight.clone(), grad_y, activation, backend=backend)
    bp = run_layer(backprop_layer, x, weight, b, None, grad_y, activation)
    for name, value in bp.items():
        assert fa[name].isnan().any() and fa[name].isnan().any() == value.isnan().any(), name
        torch.testing.assert_close(fa[name], value, equal_nan=True, atol=1e-5, rtol=1e-5, msg=name)


def test_triton_rejects_float64():
    x, weight, b, feedback, _ = make_inputs((2,), 3, 4, torch.float64, "cpu")
    with pytest.raises(TypeError, match="float64.*backend='torch'"):
        fa_linear(x, weight, b, feedback, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_output_can_be_modified_in_place_when_nothing_needs_it(backend):
    # identity saves no activation, so an in-place op on y is legal, as after nn.Linear.
    device = "cpu" if backend == "torch" else KERNEL_DEVICE
    x, weight, b, feedback, grad_y = make_inputs((3,), 4, 5, torch.float32, device)
    weight.requires_grad_(True)
    y = fa_linear(x, weight, b, feedback, "identity", backend=backend)
    y.mul_(2)
    y.backward(grad_y)
    torch.testing.assert_close(weight.grad, 2 * grad_y.t() @ x)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_in_place_change_of_a_saved_output_is_caught(backend):
    device = "cpu" if backend == "torch" else KERNEL_DEVICE
    x, weight, b, feedback, grad_y = make_inputs((3,), 4, 5, torch.float32, device)
    weight.requires_grad_(True)
    y = fa_linear(x, weight, b, feedback, "relu", backend=backend)
    y.add_(1)  # relu's backward reads y: autograd must refuse rather than compute a wrong gradient
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(grad_y)
