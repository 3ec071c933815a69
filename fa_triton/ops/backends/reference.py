"""The reference backend (``backend="torch"``): the FA layer's math in plain PyTorch ops, on any
device and in any floating dtype (float64 included); the CPU path and the benchmarks' baseline.

The eight steps, with the signatures every backend shares (``registry.Backend``)::

    forward(x, weight, bias, activation, negative_slope, store_extra, out=None)
        x [..., K], weight [N, K], bias [N] -> (y [..., N] (into out if given), the extra tensor or None)
    local_error(grad_y, saved, activation, negative_slope, need_delta, bias_grad)
        grad_y, saved [M, N] -> (δ [M, N] or None, grad_b [N] or None); δ is grad_y itself for the identity
    backward_input(delta, feedback, weight, counter, rule)   δ [M, N], B from the rule -> grad_x [M, K]
    backward_weight(delta, x)                                 δ [M, N], x [M, K] -> grad_W [N, K]
    dfa_delta(error, feedback, saved, activations, widths)    e [M, n_out], B [n_out, Σ n_l] -> δ [M, Σ n_l]
    feedback_matrix(weight, feedback, counter, rule)          B [N, K] as the rule forms it
    chain_forward(x, weights, biases, activations, out=None, stepwise=None)  x [M, K] -> [y_1 … y_L]
        of a chain in one fused launch (activations: (activation, negative_slope) per layer; out:
        the last y), or None
    chain_backward(grad_y, x, outputs, form_feedback, activations, need_grad_x, bias_grads, weight_grads,
                   methods=(), stepwise=None)
        g [M, N_L], x [M, K], y_l -> ([grad_W_l or None], [grad_b_l or None], grad_x or None) of a
        chain in fused launches (form_feedback(l) -> B_l, called only once it fuses; the top y
        None for the identity), or None
    (``methods``: each layer's rule's method; ``stepwise``: a callable that runs what the caller
    runs on None, the chain layer by layer or step by step. "auto" times the fused form against
    ``stepwise``, keyed by the methods too: how B is formed changes the two forms' costs.)

``saved`` is y, or the extra tensor (z, or f'(z) for gelu) where f' cannot be read off y
(``fa_triton.rules.activations.saves_extra``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...rules.activations import activation_backward, apply_activation, extra_for_backward
from ...rules.methods import FeedbackRule
from ...rules.methods import feedback_matrix as _rule_matrix
from .registry import Backend, register


def forward(x, weight, bias, activation: str, negative_slope: float, store_extra: bool, out=None):
    """(y = f(x Wᵀ + b), the extra tensor backward reads, or None unless ``store_extra``)."""
    z = F.linear(x, weight, bias)
    y = apply_activation(z, activation, negative_slope)
    if out is not None:
        y = out.copy_(y)
    return y, extra_for_backward(z, activation) if store_extra else None


def local_error(grad_y, saved, activation: str, negative_slope: float, need_delta: bool, bias_grad: bool):
    """(δ = g ⊙ f'(z) or None unless ``need_delta``, grad_b = Σ_rows δ or None unless ``bias_grad``)."""
    delta = activation_backward(grad_y, saved, activation, negative_slope)
    return (delta if need_delta else None), (delta.sum(0) if bias_grad else None)


def backward_input(delta, feedback, weight, counter, rule: FeedbackRule):
    """grad_x = δ B: B in place of W, the only change from backprop, formed by ``rule`` from
    feedback, weight and counter (``fa_triton.rules.methods.feedback_matrix``)."""
    return delta.mm(_rule_matrix(rule, weight, feedback, counter))  # mm: matmul's dispatch costs a µs


def backward_weight(delta, x):
    """grad_W = δᵀ x (2-D inputs)."""
    return delta.t().mm(x)


def dfa_delta(error, feedback, saved, activations: tuple, widths: tuple):
    """Direct feedback alignment's local errors of every hidden layer: δ_l = (e B_l) ⊙ f_l'(z_l),
    side by side [M, Σ n_l]; ``saved`` [M, Σ n_l] holds each layer's y (or extra tensor; None
    when every activation is the identity), ``activations`` each layer's (activation, negative_slope)."""
    projected = (error if error.dtype == feedback.dtype else error.to(feedback.dtype)).mm(feedback)
    if saved is None:
        if any(activation != "identity" for activation, _ in activations):
            raise ValueError("dfa_delta needs saved (each layer's y or extra tensor) for f' other than the identity")
        return projected
    if all(pair == activations[0] for pair in activations):  # one f' for all (a chain's step, an MLP): one pass
        activation, slope = activations[0]
        return activation_backward(projected, saved, activation, slope)
    pieces = zip(torch.split(projected, widths, dim=1), torch.split(saved, widths, dim=1), activations)
    return torch.cat([activation_backward(p, s, activation, slope) for p, s, (activation, slope) in pieces], dim=1)


def feedback_matrix(weight, feedback, counter, rule: FeedbackRule):
    """B [N, K] as ``rule`` forms it (``fa_triton.rules.methods.feedback_matrix``)."""
    return _rule_matrix(rule, weight, feedback, counter)


def chain_forward(x, weights, biases, activations, out=None, stepwise=None):
    """None: the reference has no fused chain (each layer's forward runs in turn)."""
    return None


def chain_backward(grad_y, x, outputs, form_feedback, activations, need_grad_x, bias_grads, weight_grads,
                   methods=(), stepwise=None):
    """None: the reference has no fused chain (the chain's backward runs step by step)."""
    return None


TORCH = register(Backend("torch", forward, local_error, backward_input, backward_weight, dfa_delta, feedback_matrix,
                         chain_forward, chain_backward))
