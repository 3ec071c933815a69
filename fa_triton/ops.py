"""The FA layer as ``torch.library`` custom ops, so that ``torch.compile`` and ``torch.export``
trace it as single graph nodes, with no graph break.

Two families of ops, one per backend, so that the backend chosen in :func:`fa_triton.fa_linear`
survives tracing. All are 2-D, like the kernel launchers (M rows, K = in_features,
N = out_features); :func:`fa_linear_op` flattens the batch dimensions around them::

    fa_triton::triton_forward(x[M,K], weight[N,K], bias[N]?, feedback[N,K], activation, negative_slope)
        -> (y[M,N], preact)
    fa_triton::triton_backward_input(grad_y[M,N], saved[M,N]?, feedback[N,K], activation, negative_slope)
        -> grad_x[M,K]
    fa_triton::triton_backward_weight(grad_y[M,N], saved[M,N]?, x[M,K], activation, negative_slope, bias_grad)
        -> (grad_W[N,K], grad_b)
    fa_triton::reference_forward / reference_backward_input / reference_backward_weight: the same
        signatures in plain PyTorch ops (any device, any floating dtype)

``preact`` is z = x Wᵀ + b [M, N] when backward needs it (``saves_preactivation``), else an
empty [0] tensor, and ``grad_b`` is [N] when ``bias_grad``, else empty [0]: an op's outputs
cannot be None. ``feedback`` is an input of the forward ops only so that autograd can save it.
The forward ops carry the FA backward (``register_autograd``); the backward ops have no
autograd of their own (like ``once_differentiable``).

These are ``custom_op``s rather than ``triton_op``s: a ``triton_op`` must launch its kernels
through ``wrap_triton``, inside the op, and the launchers in ``fa_triton.kernels`` launch them
directly. Opaque ops also keep ``backend="triton"`` on CPU tensors (Triton's interpreter) and
the reference on CUDA working under ``torch.compile``.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .activations import activation_backward, apply_activation, save_for_fa_backward, saves_preactivation

__all__ = ["fa_linear_op", "OPS"]


def _kernels():
    from .functional import _kernels

    return _kernels()


def _empty(like: Tensor) -> Tensor:
    # Placeholder for an output that is not computed (schemas have no optional outputs).
    return like.new_empty((0,))


# ----------------------------------------------------------------------------- Triton


@torch.library.custom_op("fa_triton::triton_forward", mutates_args=())
def triton_forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], feedback: Tensor, activation: str, negative_slope: float
) -> tuple[Tensor, Tensor]:
    store_preact = saves_preactivation(activation, negative_slope)
    y, preact = _kernels().fa_linear_forward(x, weight, bias, activation, negative_slope, store_preact)
    return y, preact if preact is not None else _empty(x)


@torch.library.custom_op("fa_triton::triton_backward_input", mutates_args=())
def triton_backward_input(
    grad_y: Tensor, saved: Optional[Tensor], feedback: Tensor, activation: str, negative_slope: float
) -> Tensor:
    return _kernels().fa_linear_backward_input(grad_y, saved, feedback, activation, negative_slope)


@torch.library.custom_op("fa_triton::triton_backward_weight", mutates_args=())
def triton_backward_weight(
    grad_y: Tensor, saved: Optional[Tensor], x: Tensor, activation: str, negative_slope: float, bias_grad: bool
) -> tuple[Tensor, Tensor]:
    grad_w, grad_b = _kernels().fa_linear_backward_weight(
        grad_y, saved, x, activation, negative_slope, bias_grad=bias_grad
    )
    return grad_w, grad_b if grad_b is not None else _empty(x)


# -------------------------------------------------------------------------- reference


@torch.library.custom_op("fa_triton::reference_forward", mutates_args=())
def reference_forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], feedback: Tensor, activation: str, negative_slope: float
) -> tuple[Tensor, Tensor]:
    z = F.linear(x, weight, bias)
    y = apply_activation(z, activation, negative_slope)
    return y, z if saves_preactivation(activation, negative_slope) else _empty(x)


@torch.library.custom_op("fa_triton::reference_backward_input", mutates_args=())
def reference_backward_input(
    grad_y: Tensor, saved: Optional[Tensor], feedback: Tensor, activation: str, negative_slope: float
) -> Tensor:
    delta = activation_backward(grad_y, saved, activation, negative_slope)
    return delta @ feedback  # B in place of W


@torch.library.custom_op("fa_triton::reference_backward_weight", mutates_args=())
def reference_backward_weight(
    grad_y: Tensor, saved: Optional[Tensor], x: Tensor, activation: str, negative_slope: float, bias_grad: bool
) -> tuple[Tensor, Tensor]:
    delta = activation_backward(grad_y, saved, activation, negative_slope)
    return delta.t() @ x, delta.sum(0) if bias_grad else _empty(x)


# ------------------------------------------------------------------------ fake kernels


def _forward_fake(x, weight, bias, feedback, activation, negative_slope):
    y = x.new_empty((x.shape[0], weight.shape[0]))
    preact = x.new_empty(y.shape) if saves_preactivation(activation, negative_slope) else _empty(x)
    return y, preact


def _backward_input_fake(grad_y, saved, feedback, activation, negative_slope):
    return feedback.new_empty((grad_y.shape[0], feedback.shape[1]))


def _backward_weight_fake(grad_y, saved, x, activation, negative_slope, bias_grad):
    grad_b = x.new_empty((grad_y.shape[1],)) if bias_grad else _empty(x)
    return x.new_empty((grad_y.shape[1], x.shape[1])), grad_b


# --------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    x, weight, bias, feedback, activation, negative_slope = inputs
    y, preact = output
    save_for_fa_backward(ctx, x, feedback, y, preact, activation, negative_slope)


def fa_backward(ctx, grad_y, x, feedback, saved, backward_input, backward_weight, bias_grad_in_fp32: bool):
    """(grad_x, grad_W, grad_b) of the FA layer, each None unless ``ctx.needs_input_grad`` asks for it.

    2-D throughout: grad_y and saved [M, N], x [M, K], feedback [N, K]; ``backward_input`` and
    ``backward_weight`` are one backend's kernels (launchers or ops). Shared by the eager Triton
    Function and both op families, so the three backward paths cannot drift apart.
    """
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_x = grad_w = grad_b = None
    if need_x:
        grad_x = backward_input(grad_y, saved, feedback, ctx.activation, ctx.negative_slope)
    if need_w:
        grad_w, grad_b = backward_weight(grad_y, saved, x, ctx.activation, ctx.negative_slope, need_b)
        grad_b = grad_b if need_b else None
    elif need_b:
        # Frozen weight, trainable bias: only the row sum of δ, in plain (traceable) ops.
        if bias_grad_in_fp32:  # as the kernels, whose δ is fp32
            delta = activation_backward(grad_y.float(), None if saved is None else saved.float(),
                                        ctx.activation, ctx.negative_slope)
            grad_b = delta.sum(0).to(grad_y.dtype)
        else:  # as ReferenceFALinearFunction
            grad_b = activation_backward(grad_y, saved, ctx.activation, ctx.negative_slope).sum(0)
    return grad_x, grad_w, grad_b


def _make_backward(backward_input, backward_weight, bias_grad_in_fp32: bool):
    def backward(ctx, grad_y, grad_preact):
        # preact is an internal output: nothing downstream uses it, so grad_preact is ignored.
        x, feedback, saved = ctx.saved_tensors
        grads = fa_backward(ctx, grad_y, x, feedback, saved, backward_input, backward_weight, bias_grad_in_fp32)
        return (*grads, None, None, None)

    return backward


def _register(forward, backward_input, backward_weight, bias_grad_in_fp32):
    forward.register_fake(_forward_fake)
    backward_input.register_fake(_backward_input_fake)
    backward_weight.register_fake(_backward_weight_fake)
    forward.register_autograd(
        _make_backward(backward_input, backward_weight, bias_grad_in_fp32), setup_context=_setup_context
    )


_register(triton_forward, triton_backward_input, triton_backward_weight, bias_grad_in_fp32=True)
_register(reference_forward, reference_backward_input, reference_backward_weight, bias_grad_in_fp32=False)

#: The ops of each backend: (forward, backward_input, backward_weight).
OPS = {
    "triton": (triton_forward, triton_backward_input, triton_backward_weight),
    "torch": (reference_forward, reference_backward_input, reference_backward_weight),
}


def fa_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    feedback: Tensor,
    activation: str,
    negative_slope: float,
    backend: str,
) -> Tensor:
    """The FA layer through the custom ops of ``backend`` ("triton" or "torch", already resolved).

    x [..., K], weight [N, K], bias [N] or None, feedback [N, K] -> y [..., N]. Inputs are
    not checked here: :func:`fa_triton.fa_linear` checks them and calls this when compiling.
    """
    forward = OPS[backend][0]
    y, _ = forward(x.reshape(-1, x.shape[-1]), weight, bias, feedback, activation, negative_slope)
    return y.view(*x.shape[:-1], weight.shape[0])
