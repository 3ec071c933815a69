"""The FA layer's math in plain PyTorch ops: the reference backend.

Three functions, with the same signatures and results as the Triton backend's launches
(``fa_triton.backend``), called by both the eager autograd Function
(``fa_triton.autograd.ReferenceFALinearFunction``) and the ``torch.library`` ops
(``fa_triton.ops``). Any device, any floating dtype (float64 included). Shapes::

    forward:          x [..., K], weight [N, K], bias [N]        -> y [..., N] (and the extra tensor)
    backward_input:   grad_y, saved [M, N], B from the rule      -> grad_x [M, K] (and δ)
    backward_weight:  grad_y, saved [M, N], x [M, K]             -> grad_W [N, K], grad_b [N]
"""

from __future__ import annotations

import torch.nn.functional as F

from .activations import activation_backward, apply_activation, extra_for_backward
from .methods import FeedbackRule, feedback_matrix


def forward(x, weight, bias, activation: str, negative_slope: float, store_extra: bool):
    """(y = f(x Wᵀ + b), the extra tensor backward reads, or None unless ``store_extra``)."""
    z = F.linear(x, weight, bias)
    y = apply_activation(z, activation, negative_slope)
    return y, extra_for_backward(z, activation) if store_extra else None


def backward_input(grad_y, saved, feedback, weight, counter, activation: str, negative_slope: float,
                   store_delta: bool, rule: FeedbackRule):
    """(grad_x = δ B, δ or None): B in place of W, the only change from backprop, formed by
    ``rule`` from feedback, weight and counter (``fa_triton.methods.feedback_matrix``). δ is
    returned when ``store_delta``, for :func:`backward_weight` to take with activation "identity"."""
    delta = activation_backward(grad_y, saved, activation, negative_slope)
    return delta @ feedback_matrix(rule, weight, feedback, counter), delta if store_delta else None


def backward_weight(grad_y, saved, x, activation: str, negative_slope: float, bias_grad: bool):
    """(grad_W = δᵀ x, grad_b = Σ_rows δ or None), with δ = g ⊙ f'(z) (2-D inputs)."""
    delta = activation_backward(grad_y, saved, activation, negative_slope)
    return delta.t() @ x, delta.sum(0) if bias_grad else None
