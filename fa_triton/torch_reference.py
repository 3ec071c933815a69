"""The feedback-alignment linear layer in plain PyTorch ops: the CPU path and the reference
that the Triton kernels are benchmarked against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .activations import activation_backward, apply_activation, extra_for_backward, save_for_fa_backward, saves_extra
from .validation import check_inputs


class ReferenceFALinearFunction(torch.autograd.Function):
    """y = f(x Wᵀ + b) forward; backward sends g ⊙ f'(z) through the fixed feedback B.

    Inputs: x [..., K], weight [N, K], bias [N] or None, feedback [N, K].
    Gradients: x, weight, bias; feedback gets none.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, feedback, activation, negative_slope):
        # This Function is the CPU training path, where a small layer's step is dominated by
        # per-call overhead: each op and Python branch here costs about as much as it saves.
        z = F.linear(x, weight, bias)
        y = apply_activation(z, activation, negative_slope)
        # f'(z) for gelu is computed only when a backward will read it.
        extra = None
        if saves_extra(activation, negative_slope) and any(ctx.needs_input_grad[:3]):
            extra = extra_for_backward(z, activation)
        save_for_fa_backward(ctx, x, feedback, y, extra, activation, negative_slope)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, feedback, saved = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        delta = activation_backward(grad_y, saved, ctx.activation, ctx.negative_slope)
        grad_x = delta @ feedback if need_x else None  # B in place of W: the only change from backprop
        grad_w = grad_b = None
        if need_w or need_b:
            if delta.dim() != 2:
                delta = delta.reshape(-1, delta.shape[-1])
            if need_w:
                grad_w = delta.t() @ (x if x.dim() == 2 else x.reshape(-1, x.shape[-1]))
            if need_b:
                grad_b = delta.sum(0)
        return grad_x, grad_w, grad_b, None, None, None


def reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    feedback: torch.Tensor,
    activation: str = "relu",
    *,
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """Feedback-alignment linear layer in plain PyTorch; same contract as :func:`fa_triton.fa_linear`.

    x [..., in], weight [out, in], bias [out] or None, feedback [out, in] -> y [..., out].
    Works on any device and in any floating dtype (float64 included).
    """
    check_inputs(x, weight, bias, feedback, activation, negative_slope)
    return ReferenceFALinearFunction.apply(x, weight, bias, feedback, activation, float(negative_slope))
