"""Argument checks shared by every entry point: bad input fails here, with the argument named."""

from __future__ import annotations

import math

import torch

from ..rules.activations import check_activation
from ..rules.methods import FEEDBACK_METHODS, check_method


def inputs_fit(x, weight, bias, feedback) -> bool:
    """A fast test that the layer's tensors fit together (what :func:`check_inputs` checks, but
    the activation): True in the common case; when False, check_inputs says what is wrong."""
    try:
        if bias is not None and (bias.dtype != x.dtype or bias.device != x.device or bias.dim() != 1
                                 or bias.shape[0] != weight.shape[0]):
            return False
        return (x.shape[-1] == weight.shape[1] and weight.dim() == 2 and feedback.dim() == 2
                and feedback.shape[0] == weight.shape[0] and feedback.shape[1] == weight.shape[1]
                and x.dtype == weight.dtype == feedback.dtype and x.dtype.is_floating_point
                and x.device == weight.device == feedback.device and isinstance(x, torch.Tensor))
    except (AttributeError, IndexError, TypeError):
        return False


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    feedback: torch.Tensor | None,
    activation: str,
    negative_slope: float,
    *,
    needs_feedback: bool = True,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument if the layer's inputs do not fit together.

    ``needs_feedback``: the method reads a feedback tensor (else ``feedback`` must be None; see
    :func:`check_method_arguments`)."""
    for name, t in (("x", x), ("weight", weight)) + ((("feedback", feedback),) if needs_feedback else ()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    check_activation(activation, negative_slope)

    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {_shape(weight)}")
    out_features, in_features = weight.shape
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"x must have shape [..., in_features={in_features}] to match weight {_shape(weight)}, "
            f"got x of shape {_shape(x)}"
        )
    if needs_feedback and feedback.shape != weight.shape:
        raise ValueError(
            f"feedback must have the shape of weight {_shape(weight)}, got feedback of shape {_shape(feedback)}"
        )
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(
            f"bias must have shape ({out_features},) to match weight {_shape(weight)}, got bias of shape {_shape(bias)}"
        )

    tensors = [("x", x), ("weight", weight)] + ([("feedback", feedback)] if needs_feedback else [])
    tensors += [("bias", bias)] if bias is not None else []
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    for name, t in tensors[1:]:
        if t.dtype != x.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but x has dtype {x.dtype}: x, weight, bias and feedback "
                "must share one dtype (cast the module with .to(dtype), or the input)"
            )
    for name, t in tensors[1:]:
        if t.device != x.device:
            raise ValueError(
                f"{name} is on device {t.device} but x is on {x.device}: x, weight, bias and feedback "
                "must be on one device"
            )


def check_method_arguments(method: str, feedback, feedback_scale, seed, counter, x: torch.Tensor) -> None:
    """Raise ``ValueError``/``TypeError`` if the arguments do not fit ``method``
    (``fa_triton.methods``): which of feedback, feedback_scale, seed and counter it takes."""
    check_method(method)
    takes_feedback = method in FEEDBACK_METHODS
    if not takes_feedback and feedback is not None:
        source = "weight itself" if method == "backprop" else "sign(weight)"
        raise ValueError(f"method={method!r} forms B from {source}: feedback must be None, got a tensor")
    takes_scale, takes_draw = method in ("usf", "brsf"), method == "brsf"
    for name, value, taken in (("feedback_scale", feedback_scale, takes_scale), ("seed", seed, takes_draw),
                               ("counter", counter, takes_draw)):
        if taken and value is None:
            raise ValueError(f"method={method!r} needs {name}")
        if not taken and value is not None:
            raise ValueError(f"method={method!r} takes no {name}, got {value!r}")
    if takes_scale and (isinstance(feedback_scale, bool) or not isinstance(feedback_scale, (int, float))
                        or not math.isfinite(feedback_scale) or feedback_scale < 0):
        raise ValueError(f"feedback_scale must be a finite number >= 0, got {feedback_scale!r}")
    if takes_draw:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        if (not isinstance(counter, torch.Tensor) or counter.dtype != torch.int64 or counter.numel() != 1
                or counter.device != x.device):
            raise ValueError(f"counter must be an int64 tensor of one element on x's device ({x.device}), got "
                             + (f"{counter.dtype} of shape {tuple(counter.shape)} on {counter.device}"
                                if isinstance(counter, torch.Tensor) else type(counter).__name__))
