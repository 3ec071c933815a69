"""Activation functions of the FA layer, in plain PyTorch.

The Triton kernels implement the same formulas (``kernels/jit_helpers.py``); this module is
the single list of names, the rule for which tensor the backward pass needs besides y, and the
PyTorch implementations used by the reference backend.
"""

from __future__ import annotations

import math

import torch

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu", "identity")

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def check_activation(activation: str, negative_slope: float) -> None:
    """Raise ``ValueError``/``TypeError`` for an unknown activation or a bad slope."""
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(f"negative_slope must be a float, got {type(negative_slope).__name__}")
    if not math.isfinite(negative_slope):
        raise ValueError(f"negative_slope must be finite, got {negative_slope}")


#: The activations for which :func:`saves_extra` may be true (a set test before the call, on the hot path).
MAY_SAVE_EXTRA = frozenset(("gelu", "leaky_relu"))


def saves_extra(activation: str, negative_slope: float) -> bool:
    """Whether backward needs a tensor besides the output y = f(z): the "extra" tensor that the
    forward stores (see :func:`extra_for_backward`).

    f'(z) can be read off y for relu, tanh, sigmoid and leaky_relu with a slope >= 0
    (y > 0 exactly where z > 0), so only y is kept. leaky_relu with a negative slope (y > 0 on
    both sides of 0) keeps z; gelu keeps f'(z) itself, computed once in the forward (the
    backward would otherwise evaluate erf and exp again in each of its kernels' programs).
    """
    return activation == "gelu" or (activation == "leaky_relu" and negative_slope < 0)


def extra_for_backward(z: torch.Tensor, activation: str) -> torch.Tensor:
    """The extra tensor of :func:`saves_extra`: f'(z) for gelu, else z; in z's dtype."""
    if activation == "gelu":
        # f'(z) = Φ(z) + z φ(z) (exact, erf form)
        return 0.5 * (1 + torch.erf(z * _INV_SQRT2)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return z


def apply_activation(z: torch.Tensor, activation: str, negative_slope: float) -> torch.Tensor:
    """y = f(z), elementwise, in z's dtype."""
    if activation == "relu":
        return torch.relu(z)
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(z, negative_slope)
    if activation == "tanh":
        return torch.tanh(z)
    if activation == "sigmoid":
        return torch.sigmoid(z)
    if activation == "gelu":
        return torch.nn.functional.gelu(z)
    return z


def activation_backward(
    grad_y: torch.Tensor, saved: torch.Tensor | None, activation: str, negative_slope: float
) -> torch.Tensor:
    """δ = g ⊙ f'(z), with ``saved`` y or the extra tensor of :func:`saves_extra`.

    Each rule is PyTorch's own, special values included: relu passes g where y is NaN and
    gives 0 (not 0·inf) where y <= 0.
    """
    if activation == "identity":
        return grad_y
    if activation == "relu":
        # PyTorch's relu backward itself: one pass, where a bool mask and `where` take four.
        return torch.ops.aten.threshold_backward.default(grad_y, saved, 0)
    if activation == "leaky_relu":
        return torch.where(saved > 0, grad_y, grad_y * negative_slope)
    if activation == "tanh":
        return grad_y * (1 - saved * saved)
    if activation == "sigmoid":
        return grad_y * saved * (1 - saved)
    return grad_y * saved  # gelu: saved is f'(z) (extra_for_backward)
