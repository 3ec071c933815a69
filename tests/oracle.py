"""The test suite's side of the float64 oracle and the tolerance policy, which live in
``fa_triton.testing`` (the oracle written from the FA equations, B from each rule's equations,
the fixed bounds derived from rounding, ``assert_parity``): re-exported here, with the inputs
the suite draws (:func:`make_inputs`), the runner (:func:`run_layer`) and the check that holds
the reference backend to the oracle before the code under test (:func:`assert_backends_parity`).

Tolerance policy (``fa_triton.testing``'s docstring derives it): float64 results within
``FLOAT64_TOLERANCE``·max(1, max|oracle|) = 1e-12·max(1, max|oracle|); fp32, tf32, fp16 and bf16
results elementwise within bounds propagated from the unit roundoff through the layer's
equations (``layer_bounds``, ``dfa_bounds``, ``tf32_bounds``). The bounds are fixed: they never
depend on another backend's error, so a bug shared by the reference and the kernels fails both.
"""

from __future__ import annotations

import math

import torch

from fa_triton.testing import (  # noqa: F401 - re-exported for the tests
    FLOAT64_TOLERANCE,
    OUTPUTS,
    activation_and_derivative,
    assert_feedback_rule,
    assert_parity,
    assert_uses_feedback,
    conv2d_oracle,
    dfa_bounds,
    dfa_oracle,
    feedback_from_backward,
    layer_bounds,
    layer_feedback,
    local_error,
    local_error_bounds,
    oracle,
    oracle_feedback,
    tf32_bounds,
)

# Elements with |z| below this get upstream gradient 0 for relu-like activations: there
# f'(z) jumps, and rounding z in the dtype under test may legitimately put it on the
# other side of 0 than the float64 oracle does. (The bounds stay sound without it: where
# |z| is within z's error bound, δ's bound admits either side of the kink; zeroing keeps
# them tight.)
KINK_MARGIN = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 2e-1}


def make_inputs(lead_shape, in_features, out_features, dtype, device, bias=True, activation="relu",
                negative_slope=0.01, seed=0):
    """x [*lead, in], weight and feedback [out, in], bias [out], grad_y [*lead, out] in ``dtype``.

    Weights as nn.Linear draws them; grad_y is zeroed where the oracle's z sits on a kink.
    """
    gen = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(in_features)

    def uniform(*shape):
        return ((torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound).to(dtype)

    x = torch.randn(*lead_shape, in_features, generator=gen, dtype=torch.float64).to(dtype)
    weight = uniform(out_features, in_features)
    feedback = uniform(out_features, in_features)
    b = uniform(out_features) if bias else None
    grad_y = torch.randn(*lead_shape, out_features, generator=gen, dtype=torch.float64).to(dtype)
    if activation in ("relu", "leaky_relu"):
        z = x.double() @ weight.double().t() + (b.double() if bias else 0)
        grad_y = torch.where(z.abs() < KINK_MARGIN[dtype], torch.zeros_like(grad_y), grad_y)
    tensors = [x, weight, b, feedback, grad_y]
    return [t.to(device) if t is not None else None for t in tensors]


def run_layer(fn, x, weight, bias, feedback, grad_y, *args, **kwargs):
    """Call ``fn(x, weight, bias, feedback, *args, **kwargs)`` and backpropagate ``grad_y``.

    Returns a dict of y and the gradients of x, weight and bias (fresh leaves, so the
    caller's tensors are untouched).
    """
    x = x.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    bias = bias.detach().clone().requires_grad_(True) if bias is not None else None
    y = fn(x, weight, bias, feedback, *args, **kwargs)
    y.backward(grad_y)
    return {
        "y": y.detach(),
        "grad_x": x.grad,
        "grad_weight": weight.grad,
        "grad_bias": bias.grad if bias is not None else None,
    }


def assert_backends_parity(result: dict, torch_result: dict, expected: dict, dtype: torch.dtype, bounds=None,
                           name: str = "triton") -> None:
    """The reference backend (``backend="torch"``) within the fixed bounds of the oracle first,
    then the code under test within the same bounds (float64: ``bounds`` None)."""
    assert_parity(torch_result, expected, dtype, bounds=bounds, name="reference (backend='torch')")
    assert_parity(result, expected, dtype, bounds=bounds, name=name)


def assert_within_bounds(result: dict, expected: dict, bounds: dict) -> None:
    """Every element of every output is within its bound of the float64 oracle."""
    assert_parity(result, {name: expected[name] for name in OUTPUTS}, bounds=bounds)
