"""The argument checks of every public entry point: bad input fails here, before torch sees it,
with the argument named (and its shapes, dtypes or devices)."""

from __future__ import annotations

import math

import torch

from ..rules.activations import ACTIVATIONS, check_activation
from ..rules.methods import FEEDBACK_METHODS, check_method


def _fits(x, weight, bias, feedback) -> bool:
    """Whether the layer's tensors fit together (the fast path of :func:`check_inputs`)."""
    try:
        if bias is not None and (bias.dtype != x.dtype or bias.device != x.device or bias.dim() != 1
                                 or bias.shape[0] != weight.shape[0]):
            return False
        # Sizes compared as ints: torch.Size == goes through symbolic shapes' sym_eq (µs a call).
        out_features, in_features = weight.shape
        feedback_rows, feedback_cols = feedback.shape
        return (type(x) is torch.Tensor and x.dim() > 0 and x.shape[-1] == in_features
                and feedback_rows == out_features and feedback_cols == in_features
                and x.dtype == weight.dtype == feedback.dtype and x.dtype.is_floating_point
                and x.device == weight.device == feedback.device)
    except (AttributeError, IndexError, TypeError, ValueError):
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
    :func:`check_method_arguments`). The common case — everything fits — costs a few attribute
    reads; only a misfit walks the checks below to say what is wrong."""
    if _fits(x, weight, bias, feedback if needs_feedback else weight) and activation in ACTIVATIONS \
            and type(negative_slope) is float and math.isfinite(negative_slope):
        return
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


def check_int(name: str, value, minimum: int = 1) -> None:
    """An int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")


def check_pair(name: str, value, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each at least ``minimum``, as (h, w) (nn.Conv2d's arguments)."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in pair):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return tuple(pair)


def check_number(name: str, value, minimum: float | None = None, positive: bool = False) -> float:
    """A finite real number (not a bool), > 0 with ``positive``, >= ``minimum`` if given."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0 or minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {'> 0' if positive else f'>= {minimum}'}, got {value!r}")
    return float(value)


def check_dtype(dtype) -> None:
    """None or a floating-point torch.dtype (a layer's parameters)."""
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")


def check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__} {generator!r}")


def check_layer_input(x, in_features: int, like: torch.Tensor, what: str) -> None:
    """x [..., in_features] of ``like``'s floating dtype and device, for ``what`` (a module's name)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} expects a torch.Tensor input, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{what} expects input [..., {in_features}], got x of shape {tuple(x.shape)}")
    if x.dtype != like.dtype or x.device != like.device:
        raise TypeError(f"{what}'s parameters are {like.dtype} on {like.device}, got x of dtype {x.dtype} on "
                        f"{x.device}: cast the module with .to(), or the input")
