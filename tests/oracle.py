"""A float64 oracle written from the FA equations, and the tolerance policy of the parity tests.

Tolerance policy: for every output (y, grad_x, grad_W, grad_b), the error of the code under
test against the float64 oracle (max absolute difference) must be at most twice the error of
PyTorch's own computation in the same dtype (``fa_triton.reference``) against the same
oracle, plus a floor of ``FLOOR[dtype] * max(1, max |oracle|)`` so that an exact PyTorch
result (error 0) does not demand an exact kernel.
"""

from __future__ import annotations

import math

import torch

FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# Elements with |z| below this get upstream gradient 0 for relu-like activations: there
# f'(z) jumps, and rounding z in the dtype under test may legitimately put it on the
# other side of 0 than the float64 oracle does.
KINK_MARGIN = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 2e-1}

OUTPUTS = ("y", "grad_x", "grad_weight", "grad_bias")


def activation_and_derivative(z: torch.Tensor, activation: str, negative_slope: float):
    """f(z) and f'(z) from their definitions, in z's dtype (float64 here)."""
    if activation == "relu":
        return torch.where(z > 0, z, 0.0), (z > 0).to(z.dtype)
    if activation == "leaky_relu":
        one = torch.ones_like(z)
        return torch.where(z > 0, z, negative_slope * z), torch.where(z > 0, one, negative_slope * one)
    if activation == "tanh":
        t = torch.tanh(z)
        return t, 1 - t * t
    if activation == "sigmoid":
        s = 1 / (1 + torch.exp(-z))
        return s, s * (1 - s)
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
        pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        return z * cdf, cdf + z * pdf
    if activation == "identity":
        return z, torch.ones_like(z)
    raise ValueError(activation)


def oracle(x, weight, bias, feedback, grad_y, activation, negative_slope=0.01):
    """y, grad_x, grad_W, grad_b of the FA layer in float64, from the equations.

    z = x Wᵀ + b, y = f(z), δ = g ⊙ f'(z), grad_x = δ B, grad_W = δᵀ x, grad_b = Σ_rows δ.
    """
    x64, w64, b64 = x.double(), weight.double(), feedback.double()
    z = x64 @ w64.t()
    if bias is not None:
        z = z + bias.double()
    y, fprime = activation_and_derivative(z, activation, negative_slope)
    delta = grad_y.double() * fprime
    delta2d, x2d = delta.reshape(-1, delta.shape[-1]), x64.reshape(-1, x64.shape[-1])
    return {
        "y": y,
        "grad_x": delta @ b64,
        "grad_weight": delta2d.t() @ x2d,
        "grad_bias": delta2d.sum(0) if bias is not None else None,
    }


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


def max_error(result: torch.Tensor, expected: torch.Tensor) -> float:
    if expected.numel() == 0:
        return 0.0
    return (result.detach().cpu().double() - expected.cpu()).abs().max().item()


def assert_parity(result: dict, torch_result: dict, expected: dict, dtype: torch.dtype, factor: float = 2.0):
    """Every output's error vs the oracle <= factor × PyTorch's same-dtype error + floor."""
    for name in OUTPUTS:
        if expected[name] is None:
            assert result[name] is None, f"{name}: expected None"
            continue
        assert result[name].shape == expected[name].shape, f"{name}: shape {result[name].shape}"
        assert result[name].dtype == dtype, f"{name}: dtype {result[name].dtype}, expected {dtype}"
        err = max_error(result[name], expected[name])
        torch_err = max_error(torch_result[name], expected[name])
        scale = max(1.0, expected[name].abs().max().item()) if expected[name].numel() else 1.0
        bound = factor * torch_err + FLOOR[dtype] * scale
        assert err <= bound, f"{name}: error {err:.3g} > {factor} x torch's {torch_err:.3g} + floor (= {bound:.3g})"


# ------------------------------------------------------------------------- tf32 error bounds

# A tf32 operand keeps 10 of fp32's 23 mantissa bits. Rounded to nearest its relative error is
# at most 2^-11, truncated (what a tensor core does when it reads fp32 words as tf32) 2^-10:
# the bound below takes truncation, the worse of the two.
TF32_UNIT = 2.0**-10
FP32_UNIT = 2.0**-24


def _dot_bound(abs_a: torch.Tensor, abs_b: torch.Tensor, length: int) -> torch.Tensor:
    """Elementwise bound on |fl(a @ b) - a @ b| for tf32 operands and fp32 accumulation.

    Each product of two tf32-rounded operands is off by a factor of at most (1 + TF32_UNIT)² and
    is exact in fp32 (10 + 10 mantissa bits); a sum of ``length`` terms in fp32, in any order,
    adds at most ``length · FP32_UNIT`` of Σ|terms| (to first order; Higham's γ_n).
    """
    per_term = (1 + TF32_UNIT) ** 2 - 1 + length * FP32_UNIT * (1 + TF32_UNIT) ** 2
    return per_term * (abs_a @ abs_b)


def tf32_bounds(x, weight, bias, feedback, grad_y, activation="relu"):
    """Elementwise error bounds of the FA layer computed with tf32 dots and fp32 accumulation.

    For relu and identity (f is 1-Lipschitz, f' exact away from the kink). Returns the bounds
    of y, grad_x, grad_W, grad_b, and ``kink``: where |z| is within the forward bound of 0, so
    that rounding may put z on either side of the kink: callers zero grad_y there (as
    KINK_MARGIN does for the same-dtype tests), else grad_x and grad_W have no bound.
    """
    if activation not in ("relu", "identity"):
        raise ValueError(f"tf32_bounds covers relu and identity, got {activation!r}")
    x64, w64, b64 = x.double().reshape(-1, x.shape[-1]), weight.double(), feedback.double()
    rows, in_features = x64.shape
    z = x64 @ w64.t()
    z_bound = _dot_bound(x64.abs(), w64.abs().t(), in_features)
    if bias is not None:
        z = z + bias.double()
        z_bound = z_bound + (z.abs() + z_bound) * FP32_UNIT  # the bias add rounds once
    kink = z.abs() <= z_bound
    delta = grad_y.double().reshape(rows, -1)
    if activation == "relu":
        delta = torch.where(z > 0, delta, 0.0)  # exact: f'(z) is 0 or 1 and z is off the kink
    return {
        "y": z_bound,
        "grad_x": _dot_bound(delta.abs(), b64.abs(), weight.shape[0]),
        "grad_weight": _dot_bound(delta.abs().t(), x64.abs(), rows),
        "grad_bias": rows * FP32_UNIT * delta.abs().sum(0) if bias is not None else None,
        "kink": kink,
    }


def assert_within_bounds(result: dict, expected: dict, bounds: dict) -> None:
    """Every element of every output is within its bound of the float64 oracle."""
    for name in OUTPUTS:
        if expected[name] is None:
            assert result[name] is None, f"{name}: expected None"
            continue
        got = result[name].detach().cpu().double().reshape(expected[name].shape)
        err = (got - expected[name].cpu()).abs().reshape(bounds[name].shape)
        excess = err - bounds[name].cpu()
        worst = int(excess.argmax())
        assert excess.max() <= 0, (
            f"{name}: error {err.flatten()[worst]:.3g} > bound {bounds[name].flatten()[worst]:.3g} "
            f"at flat index {worst}"
        )
