"""The FA layer as ``torch.library`` custom ops, so that ``torch.compile`` and ``torch.export``
trace it as single graph nodes, with no graph break.

Two families of ops, one per backend, so that the backend chosen in :func:`fa_triton.fa_linear`
survives tracing. All are 2-D, like the kernel launchers (M rows, K = in_features,
N = out_features); :func:`fa_linear_op` flattens the batch dimensions around them::

    fa_triton::triton_forward(x[M,K], weight[N,K], bias[N]?, feedback[N,K], activation, negative_slope)
        -> (y[M,N], extra)
    fa_triton::triton_backward_input(grad_y[M,N], saved[M,N]?, feedback[N,K], activation, negative_slope,
                                     store_delta) -> (grad_x[M,K], delta)
    fa_triton::triton_backward_weight(grad_y[M,N], saved[M,N]?, x[M,K], activation, negative_slope, bias_grad)
        -> (grad_W[N,K], grad_b)
    fa_triton::reference_forward / reference_backward_input / reference_backward_weight: the same
        signatures in plain PyTorch ops (any device, any floating dtype)

``extra`` is what backward reads besides y (``saves_extra``: z = x Wᵀ + b, or f'(z) for gelu)
[M, N] when it needs one, else an empty [0] tensor; ``delta`` is δ = g ⊙ f'(z) [M, N] when ``store_delta`` (the weight op then
takes δ with activation "identity"), else empty; and ``grad_b`` is [N] when ``bias_grad``, else
empty [0]: an op's outputs cannot be None. ``feedback`` is an input of the forward ops only so that autograd can save it.
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

from .activations import activation_backward, apply_activation, extra_for_backward, save_for_fa_backward, saves_extra

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
    y, extra = _kernels().fa_linear_forward(x, weight, bias, activation, negative_slope,
                                            saves_extra(activation, negative_slope))
    return y, extra if extra is not None else _empty(x)


def launch_backward_input(grad_y, saved, feedback, activation, negative_slope, store_delta):
    """(grad_x, δ or None) from the backward-input kernel; δ [M, N] is stored when ``store_delta``."""
    delta = torch.empty(grad_y.shape, device=grad_y.device, dtype=feedback.dtype) if store_delta else None
    grad_x = _kernels().fa_linear_backward_input(grad_y, saved, feedback, activation, negative_slope, delta_out=delta)
    return grad_x, delta


@torch.library.custom_op("fa_triton::triton_backward_input", mutates_args=())
def triton_backward_input(
    grad_y: Tensor, saved: Optional[Tensor], feedback: Tensor, activation: str, negative_slope: float,
    store_delta: bool,
) -> tuple[Tensor, Tensor]:
    grad_x, delta = launch_backward_input(grad_y, saved, feedback, activation, negative_slope, store_delta)
    return grad_x, delta if delta is not None else _empty(grad_x)


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
    return y, extra_for_backward(z, activation) if saves_extra(activation, negative_slope) else _empty(x)


@torch.library.custom_op("fa_triton::reference_backward_input", mutates_args=())
def reference_backward_input(
    grad_y: Tensor, saved: Optional[Tensor], feedback: Tensor, activation: str, negative_slope: float,
    store_delta: bool,
) -> tuple[Tensor, Tensor]:
    delta = activation_backward(grad_y, saved, activation, negative_slope)
    # B in place of W; an op's output must not alias its input (identity's δ is grad_y itself).
    return delta @ feedback, (delta if delta is not grad_y else delta.clone()) if store_delta else _empty(grad_y)


@torch.library.custom_op("fa_triton::reference_backward_weight", mutates_args=())
def reference_backward_weight(
    grad_y: Tensor, saved: Optional[Tensor], x: Tensor, activation: str, negative_slope: float, bias_grad: bool
) -> tuple[Tensor, Tensor]:
    delta = activation_backward(grad_y, saved, activation, negative_slope)
    return delta.t() @ x, delta.sum(0) if bias_grad else _empty(x)


# ------------------------------------------------------------------------ fake kernels


def _forward_fake(x, weight, bias, feedback, activation, negative_slope):
    y = x.new_empty((x.shape[0], weight.shape[0]))
    extra = x.new_empty(y.shape) if saves_extra(activation, negative_slope) else _empty(x)
    return y, extra


def _backward_input_fake(grad_y, saved, feedback, activation, negative_slope, store_delta):
    delta = feedback.new_empty(grad_y.shape) if store_delta else _empty(feedback)
    return feedback.new_empty((grad_y.shape[0], feedback.shape[1])), delta


def _backward_weight_fake(grad_y, saved, x, activation, negative_slope, bias_grad):
    grad_b = x.new_empty((grad_y.shape[1],)) if bias_grad else _empty(x)
    return x.new_empty((grad_y.shape[1], x.shape[1])), grad_b


# --------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    x, weight, bias, feedback, activation, negative_slope = inputs
    y, extra = output
    save_for_fa_backward(ctx, x, feedback, y, extra, activation, negative_slope)


def fa_backward(ctx, grad_y, x, feedback, saved, backward_input, backward_weight, *, stores_delta: bool,
                bias_grad_in_fp32: bool):
    """(grad_x, grad_W, grad_b) of the FA layer, each None unless ``ctx.needs_input_grad`` asks for it.

    2-D throughout: grad_y and saved [M, N], x [M, K], feedback [N, K]; ``backward_input``
    (returning grad_x and δ or None) and ``backward_weight`` are one backend's (launchers or
    ops). With ``stores_delta``, when both grad_x and grad_W are wanted the input step stores
    δ and the weight step reads it (activation "identity"), so δ is formed once. Shared by the
    eager Triton Function and both op families, so the three backward paths cannot drift apart.
    """
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    activation, negative_slope = ctx.activation, ctx.negative_slope
    store_delta = stores_delta and need_x and need_w and activation != "identity"
    grad_x = grad_w = grad_b = None
    if need_x:
        grad_x, delta = backward_input(grad_y, saved, feedback, activation, negative_slope, store_delta)
    if need_w:
        if store_delta:
            grad_w, grad_b = backward_weight(delta, None, x, "identity", negative_slope, need_b)
        else:
            grad_w, grad_b = backward_weight(grad_y, saved, x, activation, negative_slope, need_b)
        grad_b = grad_b if need_b else None
    elif need_b:
        # Frozen weight, trainable bias: only the row sum of δ, in plain (traceable) ops.
        if bias_grad_in_fp32:  # as the kernels, whose δ is fp32
            delta = activation_backward(grad_y.float(), None if saved is None else saved.float(),
                                        activation, negative_slope)
            grad_b = delta.sum(0).to(grad_y.dtype)
        else:  # as ReferenceFALinearFunction
            grad_b = activation_backward(grad_y, saved, activation, negative_slope).sum(0)
    return grad_x, grad_w, grad_b


def _make_backward(backward_input, backward_weight, stores_delta, bias_grad_in_fp32: bool):
    def backward(ctx, grad_y, grad_extra):
        # extra is an internal output: nothing downstream uses it, so grad_extra is ignored.
        x, feedback, saved = ctx.saved_tensors
        grads = fa_backward(ctx, grad_y, x, feedback, saved, backward_input, backward_weight,
                            stores_delta=stores_delta(), bias_grad_in_fp32=bias_grad_in_fp32)
        return (*grads, None, None, None)

    return backward


def triton_stores_delta() -> bool:
    """The Triton backward plan (``fa_triton.kernels.tuning.STORE_DELTA``)."""
    return _kernels().tuning.STORE_DELTA


def _register(forward, backward_input, backward_weight, stores_delta, bias_grad_in_fp32):
    forward.register_fake(_forward_fake)
    backward_input.register_fake(_backward_input_fake)
    backward_weight.register_fake(_backward_weight_fake)
    forward.register_autograd(
        _make_backward(backward_input, backward_weight, stores_delta, bias_grad_in_fp32), setup_context=_setup_context
    )


_register(triton_forward, triton_backward_input, triton_backward_weight, triton_stores_delta, bias_grad_in_fp32=True)
# The reference forms δ once whenever both gradients need it, as ReferenceFALinearFunction does.
_register(reference_forward, reference_backward_input, reference_backward_weight, lambda: True,
          bias_grad_in_fp32=False)

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
