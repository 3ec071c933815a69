"""The reference Function's relu backward: one threshold_backward pass, the same values as the kernels' where."""

import pytest
import torch

from fa_triton.activations import activation_backward
from fa_triton.torch_reference import _relu_backward

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_relu_backward_matches_where_on_special_values(dtype):
    # saved = relu(z): 0, positive, +inf or NaN; every kind of upstream gradient against each.
    saved_values = torch.tensor([0.0, 1.5, INF, NAN], dtype=dtype)
    grad_values = torch.tensor([1.0, -2.0, INF, -INF, NAN, 0.0, -0.0], dtype=dtype)
    saved = saved_values.repeat_interleave(len(grad_values)).reshape(4, -1)
    grad_y = grad_values.repeat(4).reshape(4, -1)
    expected = torch.where(saved > 0, grad_y, torch.zeros_like(grad_y))
    delta = _relu_backward(grad_y, saved)
    assert delta.dtype == dtype
    torch.testing.assert_close(delta, expected, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(delta, activation_backward(grad_y, saved, "relu", 0.0), equal_nan=True, atol=0, rtol=0)
    assert delta[0].eq(0).all() and delta[3].eq(0).all()  # saved 0 or NaN: no gradient, even for inf or NaN


def test_relu_backward_non_contiguous():
    grad_y = torch.randn(8, 6).t()
    saved = torch.relu(torch.randn(6, 8))
    torch.testing.assert_close(_relu_backward(grad_y, saved), torch.where(saved > 0, grad_y, 0.0), atol=0, rtol=0)
