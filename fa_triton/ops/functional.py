"""The functional form of the FA layer: :func:`fa_linear` (either backend) and :func:`reference`.

Both check their arguments once, here, where they enter; the autograd Functions and ops below
them do not check again.
"""

from __future__ import annotations

import torch

from ..rules.methods import FA_RULE, FEEDBACK_METHODS, rule_for
from .autograd import ReferenceFALinearFunction, apply_checked, autocast_inputs
from .validation import check_inputs, check_method_arguments


def fa_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    feedback: torch.Tensor | None,
    activation: str = "relu",
    *,
    negative_slope: float = 0.01,
    backend: str = "auto",
    method: str = "fa",
    feedback_scale: float | None = None,
    seed: int | None = None,
    counter: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feedback-alignment linear layer: ``y = f(x Wᵀ + b)``, gradients sent back through B.

    Args:
        x: input [..., in_features].
        weight: W [out_features, in_features] (nn.Linear's layout).
        bias: b [out_features] or None.
        feedback: [out_features, in_features]: B for "fa" and "wm" (no gradient); B for "kp",
            which receives W's gradient; R for "frsf" (|R|·sign(W)); None for "backprop",
            "usf" and "brsf".
        activation: one of ``fa_triton.ACTIVATIONS``.
        negative_slope: slope of ``"leaky_relu"`` for z < 0.
        backend: ``"triton"`` (fused kernels), ``"torch"`` (reference) or ``"auto"`` (on CUDA, per step
            whichever of the two is faster there; else the reference).
        method: one of ``fa_triton.METHODS`` (``fa_triton.methods``).
        feedback_scale: "usf": s of B = s·sign(W); "brsf": the bound b of |R| ~ U(0, b).
        seed, counter: "brsf": R's Philox seed and draw number (an int64 tensor [1] on x's
            device; the caller advances it for a new R, as ``FALinear`` does in training).
    Returns:
        y [..., out_features]; under ``torch.autocast`` in the autocast dtype, as ``nn.Linear``.
    """
    x, weight, bias, feedback = autocast_inputs(x, weight, bias, feedback)
    if method != "fa" or feedback_scale is not None or seed is not None or counter is not None:
        # (fa takes none of these: one given is an error, not silently ignored.)
        check_method_arguments(method, feedback, feedback_scale, seed, counter, x)
    check_inputs(x, weight, bias, feedback, activation, negative_slope, needs_feedback=method in FEEDBACK_METHODS)
    return apply_checked(x, weight, bias, feedback, counter, activation, float(negative_slope),
                         rule_for(method, feedback_scale, seed), backend)


def reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    feedback: torch.Tensor,
    activation: str = "relu",
    *,
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """Feedback-alignment linear layer in plain PyTorch; same contract as :func:`fa_linear`.

    x [..., in], weight [out, in], bias [out] or None, feedback [out, in] -> y [..., out].
    Works on any device and in any floating dtype (float64 included).
    """
    check_inputs(x, weight, bias, feedback, activation, negative_slope)
    return ReferenceFALinearFunction.apply(x, weight, bias, feedback, None, activation, float(negative_slope), FA_RULE)
