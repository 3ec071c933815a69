"""The functional form of the FA layer: :func:`fa_linear` (either backend) and :func:`reference`.

Both check their arguments once, here, where they enter; the autograd Functions and ops below
them do not check again.
"""

from __future__ import annotations

import torch

from ..rules.methods import FA_RULE, FEEDBACK_METHODS, FeedbackRule, rule_for
from .autograd import ReferenceFALinearFunction
from .backends import resolve
from .library import fa_linear_op
from .validation import check_inputs, check_method_arguments


@torch.compiler.assume_constant_result
def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for ``device_type``, or None outside an autocast region.

    Dynamo cannot trace ``torch.amp.is_autocast_available`` on every torch version (torch 2.11
    fails on it), so this is evaluated while tracing and its result kept as a constant; the
    autocast state is part of Dynamo's global guards, so a change of it recompiles.
    """
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_inputs(x, weight, bias, feedback):
    """x, weight, bias, feedback cast as ``torch.autocast`` casts ``F.linear``'s arguments.

    Inside an autocast region for x's device type, floating-point tensors other than float64
    are cast to the autocast dtype (the casts are differentiable: fp32 master weights get fp32
    gradients); outside one, they are returned unchanged.
    """
    # One C call when no autocast is on anywhere (the common case); Dynamo folds it to a constant.
    if not torch._C._is_any_autocast_enabled() or not isinstance(x, torch.Tensor):
        return x, weight, bias, feedback
    dtype = _autocast_dtype(x.device.type)
    if dtype is None:
        return x, weight, bias, feedback

    def cast(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
            return t.to(dtype)
        return t

    return cast(x), cast(weight), cast(bias), cast(feedback)


def apply_checked(x, weight, bias, feedback, counter, activation: str, negative_slope: float, rule: FeedbackRule,
                  backend: str) -> torch.Tensor:
    """The layer on inputs already checked (and autocast): the resolved backend's autograd
    Function in eager mode, its ``torch.library`` op while tracing."""
    resolved = resolve(backend, x)
    if torch.compiler.is_compiling() and resolved.name != "torch":
        # torch.compile / torch.export trace the kernels' torch.library ops (one graph node
        # each, no graph break). The reference's Function is traced through: its plain aten ops
        # are what Inductor fuses. Eager mode keeps the autograd Functions: they cost less per call.
        return fa_linear_op(x, weight, bias, feedback, counter, activation, negative_slope, rule, resolved)
    return resolved.function.apply(x, weight, bias, feedback, counter, activation, negative_slope, rule)


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
