"""Argument checks shared by every entry point: bad input fails here, with the argument named."""

from __future__ import annotations

import torch

from .activations import check_activation


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
    feedback: torch.Tensor,
    activation: str,
    negative_slope: float,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument if the layer's inputs do not fit together."""
    for name, t in (("x", x), ("weight", weight), ("feedback", feedback)):
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
    if feedback.shape != weight.shape:
        raise ValueError(
            f"feedback must have the shape of weight {_shape(weight)}, got feedback of shape {_shape(feedback)}"
        )
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(
            f"bias must have shape ({out_features},) to match weight {_shape(weight)}, got bias of shape {_shape(bias)}"
        )

    tensors = [("x", x), ("weight", weight), ("feedback", feedback)] + ([("bias", bias)] if bias is not None else [])
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
