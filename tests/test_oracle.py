"""The test helpers' own checks: the tf32 error bounds (``fa_triton.testing.tf32_bounds``,
re-exported by oracle.py) hold for tf32 arithmetic (emulated on the CPU) and are tight enough to
catch coarser rounding. ``tests/test_testing.py`` checks the rest of ``fa_triton.testing``."""

import pytest
import torch

from tests.oracle import assert_within_bounds, make_inputs, oracle, tf32_bounds


def _round_mantissa(t: torch.Tensor, kept_bits: int) -> torch.Tensor:
    """float32 ``t`` truncated to ``kept_bits`` explicit mantissa bits (tf32: 10)."""
    mask = ~((1 << (23 - kept_bits)) - 1)
    return (t.contiguous().view(torch.int32) & mask).view(torch.float32)


def _emulated_layer(x, weight, bias, feedback, grad_y, activation, kept_bits):
    """The FA layer as a tf32 kernel computes it: operands of each dot truncated, fp32 sums."""
    def dot(a, b):
        return _round_mantissa(a, kept_bits) @ _round_mantissa(b, kept_bits)

    z = dot(x, weight.t()) + (bias if bias is not None else 0)
    y = torch.relu(z) if activation == "relu" else z
    delta = torch.where(z > 0, grad_y, 0.0) if activation == "relu" else grad_y
    return {"y": y, "grad_x": dot(delta, feedback), "grad_weight": dot(delta.t(), x),
            "grad_bias": delta.sum(0) if bias is not None else None}


@pytest.mark.parametrize("activation", ["relu", "identity"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("signs", ["mixed", "positive"])
def test_tf32_bounds_hold(signs, activation, bias):
    inputs = make_inputs((300,), 257, 130, torch.float32, "cpu", bias=bias, activation=activation)
    if signs == "positive":  # truncation errors then all point one way and add up
        inputs = [t.abs() if t is not None else None for t in inputs]
    x, weight, b, feedback, grad_y = inputs
    bounds = tf32_bounds(x, weight, b, feedback, grad_y, activation)
    grad_y = torch.where(bounds["kink"], 0.0, grad_y)
    expected = oracle(x, weight, b, feedback, grad_y, activation)
    assert_within_bounds(_emulated_layer(x, weight, b, feedback, grad_y, activation, 10), expected, bounds)


def test_tf32_bounds_catch_coarser_rounding():
    # The bound is a worst case; with all-positive operands truncation reaches half of it, so
    # two mantissa bits fewer (4x the rounding error) must break it for every dot product.
    x, weight, b, feedback, grad_y = [t.abs() for t in make_inputs((300,), 257, 130, torch.float32, "cpu",
                                                                   activation="identity")]
    bounds = tf32_bounds(x, weight, b, feedback, grad_y, "identity")
    expected = oracle(x, weight, b, feedback, grad_y, "identity")
    coarse = _emulated_layer(x, weight, b, feedback, grad_y, "identity", 8)
    for name in ("y", "grad_x", "grad_weight"):
        with pytest.raises(AssertionError, match=name):
            assert_within_bounds({**expected, name: coarse[name]}, expected, bounds)


def test_tf32_bounds_refuse_unknown_activations():
    x, weight, b, feedback, grad_y = make_inputs((4,), 8, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="activation must be one of"):
        tf32_bounds(x, weight, b, feedback, grad_y, "rleu")
