"""The autograd of ``FAConv2d``: nn.Conv2d's forward (+ activation), and a backward that sends
δ = g ⊙ f'(z) through B instead of W. Its convolutions are PyTorch's (cuDNN on a GPU); what it
saves for backward is the FA layer's rule (``autograd.save_for_fa_backward``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..rules.activations import activation_backward, apply_activation, extra_for_backward, saves_extra
from ..rules.methods import feedback_matrix
from .autograd import needs_saved, once_differentiable, save_for_fa_backward, weight_and_feedback_grads


class FAConv2dFunction(torch.autograd.Function):
    """z = conv2d(x, W, b), y = f(z); backward: grad_x = conv_transpose(δ, B), grad_W, grad_b as
    nn.Conv2d's, B formed by ``rule`` from feedback (B, W for backprop, R for frsf), weight and
    counter (kp: B gets grad_W).

    x [N, C_in, H, W] (already padded when the padding is not zeros or not symmetric),
    weight and feedback [C_out, C_in / groups, kh, kw] -> y [N, C_out, H_out, W_out].
    """

    @staticmethod
    def forward(ctx, x, weight, bias, feedback, counter, stride, padding, dilation, groups, activation,
                negative_slope, rule):
        z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        y = apply_activation(z, activation, negative_slope)
        saved = None
        if needs_saved(ctx, activation, rule):
            saved = extra_for_backward(z, activation) if saves_extra(activation, negative_slope) else y
        save_for_fa_backward(ctx, x, weight, feedback, counter, saved, activation, negative_slope, rule)
        ctx.x_shape, ctx.weight_shape = x.shape, weight.shape
        ctx.conv = (stride, padding, dilation, groups)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, feedback, counter, saved = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        activation, negative_slope, rule, _ = ctx.layer
        need_feedback = rule.trains_feedback and ctx.needs_input_grad[3]
        stride, padding, dilation, groups = ctx.conv
        delta = activation_backward(grad_y, saved, activation, negative_slope)
        grad_x = grad_w = grad_b = None
        if need_x:
            # B in place of W: the only change from backprop (formed from W's sign for usf, frsf, brsf).
            grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, feedback_matrix(rule, weight, feedback, counter), delta,
                                                stride, padding, dilation, groups)
        if need_w or need_feedback:
            grad_w = torch.nn.grad.conv2d_weight(x, ctx.weight_shape, delta, stride, padding, dilation, groups)
        if need_b:
            grad_b = delta.sum((0, 2, 3))
        grad_w, grad_feedback = weight_and_feedback_grads(grad_w, need_w, need_feedback)
        return (grad_x, grad_w, grad_b, grad_feedback, *([None] * 8))
