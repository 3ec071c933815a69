"""Alignment metrics of feedback alignment: how far W has turned towards B, and FA's gradient towards backprop's.

Feedback alignment's signature result (Lillicrap et al. 2016) is that both angles fall well
below 90° during training: the forward weights come to align with the fixed feedback matrices,
and so the FA update becomes a descent direction close to the true gradient.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, NamedTuple

import torch
from torch import nn

from .layers.conv import FAConv2d
from .layers.linear import FALinear

FA_LAYER_TYPES = (FALinear, FAConv2d)


class WeightAlignment(NamedTuple):
    angle: float
    """Angle in degrees between W and B, both flattened."""
    norm_ratio: float
    """‖W‖ / ‖B‖ (Frobenius norms)."""


def angle_between(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle in degrees between two tensors of the same shape, flattened; float64 math.

    90° when either tensor is zero (no direction to align with).
    """
    if a.shape != b.shape:
        raise ValueError(f"angle_between needs tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a64 = a.detach().reshape(-1).double()
    b64 = b.detach().reshape(-1).double()
    denom = (a64.norm() * b64.norm()).item()
    if denom == 0.0:
        return 90.0
    cosine = max(-1.0, min(1.0, torch.dot(a64, b64).item() / denom))
    return math.degrees(math.acos(cosine))


def fa_layers(model: nn.Module) -> list[FALinear | FAConv2d]:
    """The :class:`FALinear` and :class:`FAConv2d` layers of ``model``, in ``model.modules()`` order."""
    return [m for m in model.modules() if isinstance(m, FA_LAYER_TYPES)]


def weight_alignment(layer: FALinear | FAConv2d) -> WeightAlignment:
    """Angle (degrees) between the layer's flattened ``weight`` W and its B, and ‖W‖/‖B‖.

    B as the layer's method forms it (``FALinear.feedback_matrix``): the feedback matrix (fa,
    kp, wm), W (backprop: 0°), s·sign(W) (usf: the angle between W and sign(W)), |R|·sign(W)
    (frsf; brsf's latest draw)."""
    if not isinstance(layer, FA_LAYER_TYPES):
        raise TypeError(f"layer must be an FALinear or FAConv2d, got {type(layer).__name__}")
    weight, feedback = layer.weight.detach(), layer.feedback_matrix()
    feedback_norm = feedback.double().norm().item()
    ratio = weight.double().norm().item() / feedback_norm if feedback_norm > 0 else math.inf
    return WeightAlignment(angle_between(weight, feedback), ratio)


def gradient_alignment(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> list[float]:
    """Per FA layer (FALinear, FAConv2d), the angle (degrees) between the FA gradient of W and backprop's.

    Both gradients are of ``loss_fn(model(x), y)`` on the same batch; the backprop one is
    computed with every layer temporarily in method "backprop" (B = W: exactly backprop). The
    model's ``.grad`` fields, feedback matrices and brsf draw counters are left as they were.
    The last layer's angle is 0 up to rounding: its weight gradient does not pass through any
    feedback matrix. DFA models (``DFAModel``, ``DFANetwork``) are compared with backprop through
    the same network (its ``plain_forward``). A layer whose weight is frozen
    (``requires_grad=False``) gets NaN. Pass a plain module, not a
    ``DistributedDataParallel`` wrapper (its reducer expects ``backward()``): ``ddp.module``.
    """
    layers = fa_layers(model)
    if not layers:
        raise ValueError(f"model has no FALinear or FAConv2d layer: {type(model).__name__}")
    weights = [layer.weight for layer in layers]
    trained = [weight for weight in weights if weight.requires_grad]
    if not trained:
        return [float("nan")] * len(layers)

    def weight_grads(forward) -> tuple[torch.Tensor | None, ...]:
        # autograd.grad, not backward(): the model's accumulated .grad stay untouched.
        loss = loss_fn(forward(x), y)
        grads = iter(torch.autograd.grad(loss, trained, allow_unused=True))
        return tuple(next(grads) if weight.requires_grad else None for weight in weights)

    with contextlib.ExitStack() as stack:
        for layer in layers:  # brsf's draws are left as they were
            stack.enter_context(layer.keeping_draws())
        fa_grads = weight_grads(model)
        for layer in layers:
            stack.enter_context(layer.backward_as_backprop())  # B = W: exactly backprop
        # A DFA model's backprop is its network without the DFA taps (DFAModel, DFANetwork).
        bp_grads = weight_grads(getattr(model, "plain_forward", model))
    angles = []
    for layer, fa, bp in zip(layers, fa_grads, bp_grads):
        if not layer.weight.requires_grad:
            angles.append(float("nan"))  # a frozen weight has no gradient to compare
            continue
        if fa is None or bp is None:
            raise ValueError(f"the loss does not depend on the weight of layer {layer!r}")
        angles.append(angle_between(fa, bp))
    return angles
