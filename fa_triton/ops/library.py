"""The FA layer as ``torch.library`` custom ops, so that ``torch.compile`` and ``torch.export``
trace it as single graph nodes, with no graph break.

A family of ops per backend (``fa_triton.ops.backends``; registered on it as ``backend.ops``),
so that the backend chosen in :func:`fa_triton.fa_linear` survives tracing. All are 2-D, like the
kernel launchers (M rows, K = in_features, N = out_features); :func:`fa_linear_op` flattens the
batch dimensions around them::

    fa_triton::triton_forward(x[M,K], weight[N,K], bias[N]?, feedback[N,K]?, counter[1]?, activation,
                              negative_slope, method, scale, seed) -> (y[M,N], extra)
    fa_triton::triton_local_error(grad_y[M,N], saved[M,N]?, activation, negative_slope, need_delta, bias_grad)
        -> (delta[M,N], grad_b[N])
    fa_triton::triton_backward_input(delta[M,N], feedback[N,K]?, weight[N,K]?, counter[1]?, method, scale, seed)
        -> grad_x[M,K]
    fa_triton::triton_backward_weight(delta[M,N], x[M,K]) -> grad_W[N,K]
    fa_triton::torch_* and fa_triton::auto_*: the same signatures over the reference backend
        (plain PyTorch ops; any device, any floating dtype) and backend="auto"
    fa_triton::triton_stacked_*: the same over E models at once, every tensor with the models first
        (x [E, M, K], weight [E, N, K], y [E, M, N], grad_b [E, N]); one stacked launch per job

Under one ``torch.func.vmap`` (no other transform) the triton and auto forward ops run the
stacked ops (``register_vmap``): E seeds' layer in one launch, and plain autograd outside the vmap
runs their stacked backward; a vmap over the data alone runs the layer once on the E·M rows.
PyTorch's model-ensembling recipe (``stack_module_state``, ``vmap`` over ``functional_call``)
then costs one launch per job whatever E.

``extra`` is what backward reads besides y (``saves_extra``: z = x Wᵀ + b, or f'(z) for gelu)
[M, N] when it needs one, else an empty [0] tensor; ``delta`` is δ = g ⊙ f'(z) [M, N] when
``need_delta``, else empty; and ``grad_b`` is [N] when ``bias_grad``, else empty [0]: an op's
outputs cannot be None.
``method, scale, seed`` are the fields of a ``fa_triton.rules.methods.FeedbackRule`` (how B is
formed, and whether B trains: Kolen–Pollack); ``feedback``, ``weight`` and ``counter`` are what
the rule forms B from. ``feedback`` and ``counter`` are inputs of the forward ops so that
autograd can save them. The forward ops carry the FA backward (``register_autograd``, through
``fa_triton.ops.autograd.fa_backward``); the backward ops have no autograd of their own (like
``once_differentiable``).

These are ``custom_op``s rather than ``triton_op``s: a ``triton_op`` must launch its kernels
through ``wrap_triton``, inside the op, and the launchers in ``fa_triton.kernels`` launch them
directly. Opaque ops also keep ``backend="triton"`` on CPU tensors (Triton's interpreter) and
the reference on CUDA working under ``torch.compile``.
"""

import functools
from typing import Optional

import torch
from torch import Tensor

from ..rules.activations import saves_extra
from ..rules.methods import FeedbackRule
from .autograd import STACKED_BRSF, fa_backward, save_for_fa_backward
from .backends import AUTO, TORCH, TRITON, TRITON_STACKED, Backend

__all__ = ["fa_linear_op"]


def _empty(like: Tensor) -> Tensor:
    # Placeholder for an output that is not computed (schemas have no optional outputs).
    return like.new_empty((0,))


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return t if t is not None else _empty(like)


def _define(backend: Backend):
    """The four ops of one backend, over its steps."""
    prefix = f"fa_triton::{backend.name}"

    @torch.library.custom_op(f"{prefix}_forward", mutates_args=())
    def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], feedback: Optional[Tensor],
                counter: Optional[Tensor], activation: str, negative_slope: float, method: str, scale: float,
                seed: int) -> tuple[Tensor, Tensor]:
        y, extra = backend.forward(x, weight, bias, activation, negative_slope, saves_extra(activation, negative_slope))
        return y, _or_empty(extra, x)

    @torch.library.custom_op(f"{prefix}_local_error", mutates_args=())
    def local_error(grad_y: Tensor, saved: Optional[Tensor], activation: str, negative_slope: float, need_delta: bool,
                    bias_grad: bool) -> tuple[Tensor, Tensor]:
        delta, grad_b = backend.local_error(grad_y, saved, activation, negative_slope, need_delta, bias_grad)
        # δ as its fake says: contiguous, and not an alias of the input (the identity's δ is
        # grad_y itself; the reference's follows grad_y's strides).
        if delta is grad_y:
            delta = delta.clone(memory_format=torch.contiguous_format)
        elif delta is not None:
            delta = delta.contiguous()
        return _or_empty(delta, grad_y), _or_empty(grad_b, grad_y)

    @torch.library.custom_op(f"{prefix}_backward_input", mutates_args=())
    def backward_input(delta: Tensor, feedback: Optional[Tensor], weight: Optional[Tensor], counter: Optional[Tensor],
                       method: str, scale: float, seed: int) -> Tensor:
        return backend.backward_input(delta, feedback, weight, counter, FeedbackRule(method, scale, seed))

    @torch.library.custom_op(f"{prefix}_backward_weight", mutates_args=())
    def backward_weight(delta: Tensor, x: Tensor) -> Tensor:
        return backend.backward_weight(delta, x)

    forward.register_fake(_forward_fake)
    local_error.register_fake(_local_error_fake)
    backward_input.register_fake(_backward_input_fake)
    backward_weight.register_fake(_backward_weight_fake)

    def local_error_or_none(grad_y, saved, activation, negative_slope, need_delta, bias_grad):
        delta, grad_b = local_error(grad_y, saved, activation, negative_slope, need_delta, bias_grad)
        return (delta if need_delta else None), (grad_b if bias_grad else None)

    def backward_input_from_rule(delta, feedback, weight, counter, rule):
        return backward_input(delta, feedback, weight, counter, rule.method, rule.scale, rule.seed)

    # The backward graph calls this family's backward ops.
    op_backend = backend.replace(forward=forward, local_error=local_error_or_none,
                                 backward_input=backward_input_from_rule, backward_weight=backward_weight)

    def backward(ctx, grad_y, grad_extra):
        # extra is an internal output: nothing downstream uses it, so grad_extra is ignored.
        return (*fa_backward(ctx, grad_y, op_backend), None, None, None, None, None, None)

    forward.register_autograd(backward, setup_context=_setup_context)
    return forward, local_error, backward_input, backward_weight


# The fakes: shapes as the ops give them, with any leading model axis of the stacked family.

def _forward_fake(x, weight, bias, feedback, counter, activation, negative_slope, method, scale, seed):
    y = x.new_empty((*x.shape[:-1], weight.shape[-2]))
    return y, x.new_empty(y.shape) if saves_extra(activation, negative_slope) else _empty(x)


def _local_error_fake(grad_y, saved, activation, negative_slope, need_delta, bias_grad):
    delta = grad_y.new_empty(grad_y.shape) if need_delta else _empty(grad_y)
    return delta, grad_y.new_empty((*grad_y.shape[:-2], grad_y.shape[-1])) if bias_grad else _empty(grad_y)


def _backward_input_fake(delta, feedback, weight, counter, method, scale, seed):
    source = weight if FeedbackRule(method).reads_weight else feedback
    return source.new_empty((*delta.shape[:-1], source.shape[-1]))


def _backward_weight_fake(delta, x):
    return x.new_empty((*delta.shape[:-2], delta.shape[-1], x.shape[-1]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, feedback, counter, activation, negative_slope, method, scale, seed = inputs
    y, extra = output
    rule = FeedbackRule(method, scale, seed)
    saved = extra if saves_extra(activation, negative_slope) else y
    save_for_fa_backward(ctx, x, weight, feedback, counter, saved, activation, negative_slope, rule)


def fa_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], feedback: Optional[Tensor],
                 counter: Optional[Tensor], activation: str, negative_slope: float, rule: FeedbackRule,
                 backend: Backend) -> Tensor:
    """The FA layer through the custom ops of ``backend`` (resolved: ``fa_triton.ops.backends.resolve``).

    x [..., K], weight [N, K], bias [N] or None, feedback [N, K] or None and counter as ``rule``
    needs -> y [..., N]. Inputs are not checked here: :func:`fa_triton.fa_linear` checks them
    and calls this when compiling.
    """
    forward = backend.ops[0]
    y, _ = forward(x.reshape(-1, x.shape[-1]), weight, bias, feedback, counter, activation, negative_slope,
                   rule.method, rule.scale, rule.seed)
    return y.view(*x.shape[:-1], weight.shape[0])


for _backend in (TRITON, TORCH, AUTO):
    # (forward, local_error, backward_input, backward_weight) of each backend, and the layer over them.
    _backend.ops = _define(_backend)
    _backend.layer_op = functools.partial(fa_linear_op, backend=_backend)
# The same four ops over E models at once (fa_triton::triton_stacked_*), for the vmap rule below.
TRITON_STACKED.ops = _define(TRITON_STACKED)


def _stack(t: Optional[Tensor], dim: Optional[int], models: int) -> Optional[Tensor]:
    """``t`` with the models first: its vmapped dimension moved there, or, shared by all models,
    expanded along a new one (a view with stride 0: nothing is copied)."""
    if t is None or dim == 0:
        return t
    return t.movedim(dim, 0) if dim is not None else t.expand(models, *t.shape)


def _vmap_forward(backend: Backend, info, in_dims, x, weight, bias, feedback, counter, activation, negative_slope,
                  method, scale, seed):
    """``backend``'s forward op under ``torch.func.vmap``. E models stacked by
    ``torch.func.stack_module_state``: the stacked ops, one launch per job for all E models,
    whose backward (plain autograd outside the vmap) is stacked too. The data alone batched
    (one layer for every member): the members' rows are one batch of E·M rows, so the layer's
    own op runs once on them, as on any flattened batch."""
    x_dim, weight_dim, bias_dim, feedback_dim, counter_dim = in_dims[:5]
    if counter_dim is not None:
        raise ValueError(STACKED_BRSF)
    if weight_dim is None and bias_dim is None and feedback_dim is None:
        rows = x.movedim(x_dim, 0)  # [E, M, K]: each member's x is 2-D (fa_linear_op flattens it)
        y, extra = backend.ops[0](rows.reshape(-1, rows.shape[-1]), weight, bias, feedback, counter, activation,
                                  negative_slope, method, scale, seed)
        y = y.view(*rows.shape[:-1], y.shape[-1])
        if extra.dim() == 2:
            return (y, extra.view(y.shape)), (0, 0)
        return (y, extra), (0, None)
    y, extra = TRITON_STACKED.ops[0](_stack(x, x_dim, info.batch_size), _stack(weight, weight_dim, info.batch_size),
                                     _stack(bias, bias_dim, info.batch_size),
                                     _stack(feedback, feedback_dim, info.batch_size), counter, activation,
                                     negative_slope, method, scale, seed)
    return (y, extra), (0, 0 if extra.dim() == 3 else None)


for _backend in (TRITON, AUTO):
    _backend.ops[0].register_vmap(functools.partial(_vmap_forward, _backend))
