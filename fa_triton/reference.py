"""The FA layer's math in plain PyTorch ops: the reference backend.

Four functions, with the same signatures and results as the Triton backend's launches
(``fa_triton.backend``), called by both the eager autograd Function
(``fa_triton.autograd.ReferenceFALinearFunction``) and the ``torch.library`` ops
(``fa_triton.ops``). Any device, any floating dtype (float64 included). Shapes::

    forward:          x [..., K], weight [N, K], bias [N]        -> y [..., N] (and the extra tensor)
    local_error:      grad_y, saved [M, N]                       -> δ [M, N], grad_b [N]
    backward_input:   δ [M, N], B from the rule                  -> grad_x [M, K]
    backward_weight:  δ [M, N], x [M, K]                         -> grad_W [N, K]
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


def local_error(grad_y, saved, activation: str, negative_slope: float, need_delta: bool, bias_grad: bool):
    """(δ = g ⊙ f'(z) or None unless ``need_delta``, grad_b = Σ_rows δ or None unless ``bias_grad``);
    for the identity δ is grad_y itself."""
    delta = activation_backward(grad_y, saved, activation, negative_slope)
    return (delta if need_delta else None), (delta.sum(0) if bias_grad else None)


def backward_input(delta, feedback, weight, counter, rule: FeedbackRule):
    """grad_x = δ B: B in place of W, the only change from backprop, formed by ``rule`` from
    feedback, weight and counter (``fa_triton.methods.feedback_matrix``)."""
    return delta @ feedback_matrix(rule, weight, feedback, counter)


def backward_weight(delta, x):
    """grad_W = δᵀ x (2-D inputs)."""
    return delta.t() @ x
