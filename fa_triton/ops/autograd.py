"""The FA layer's autograd: what every FA backward saves (the one home of that rule: the linear
layer's Functions here and ``library.py``'s ops, FAConv2d's and DFA's Functions in ``conv.py`` and
``dfa.py``), the backward shared by every path, and the eager ``torch.autograd.Function`` of each
backend (registered on it as ``backend.function``); and the entry the layers call once their
arguments are checked, :func:`apply_checked` (with :func:`autocast_inputs` before it); brsf's
draw-number ops (:func:`next_draw`, ``fa_triton::next_draw`` and ``fa_triton::unstacked_draw``).

Eager mode calls these Functions directly (they cost less per call than the ``torch.library``
ops of ``library.py``, which ``torch.compile`` traces); both run :func:`fa_backward` with a
backend's steps (``fa_triton.ops.backends``), so they cannot drift apart.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable as _torch_once_differentiable

from ..rules.activations import MAY_SAVE_EXTRA, apply_activation, saves_extra
from ..rules.methods import FeedbackRule, feedback_matrix
from .backends import AUTO, TORCH, TRITON, AutoLayerSteps, Backend, LayerSteps, resolve


def once_differentiable(backward):
    """torch's ``once_differentiable`` (a double backward through the result is an error),
    without its ``no_grad`` context in an ordinary backward, where grad mode is already off:
    the context costs about a microsecond a call, a tenth of the layer's own host cost."""
    checked = _torch_once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():  # create_graph=True: torch's wrapper marks the double backward
            return checked(ctx, *grads)
        return backward(ctx, *grads)

    return wrapper


def needs_saved(ctx, activation: str, rule: FeedbackRule) -> bool:
    """Whether the backward reads y (or the extra tensor) for f': any gradient is wanted and f is
    not the identity."""
    need = ctx.needs_input_grad
    return _reads_saved(activation, need[0], need[1], need[2], rule.trains_feedback and need[3])


def _reads_saved(activation: str, need_x: bool, need_w: bool, need_b: bool, need_feedback: bool) -> bool:
    return activation != "identity" and (need_x or need_w or need_b or need_feedback)


def save_for_fa_backward(ctx, x, weight, feedback, counter, saved, activation: str, negative_slope: float,
                         rule: FeedbackRule, x_shape: torch.Size | None = None) -> None:
    """Save on ``ctx`` only what an FA backward reads, given ``ctx.needs_input_grad`` (inputs x,
    weight, bias, feedback first): x for grad_W; for grad_x whatever B is formed from (the
    feedback tensor — B, W for backprop, R for frsf —, W for the sign methods, the draw counter
    for brsf); ``saved`` (y or the extra tensor, see ``saves_extra``) for f', when
    :func:`needs_saved`. Every tensor goes through ``ctx.save_for_backward``, so an in-place
    change of any of them before backward is an error, not a silently wrong gradient.
    ``x_shape``: the input's shape when the Function's x has other than 2 dimensions (the
    backward flattens the batch, and gives grad_x back in that shape).
    """
    need_x, need_w, need_b, need_feedback = ctx.needs_input_grad[:4]
    need_feedback = need_feedback and rule.trains_feedback
    ctx.save_for_backward(
        x if need_w or need_feedback else None,
        weight if need_x and rule.reads_weight else None,
        feedback if need_x and rule.reads_feedback else None,
        counter if need_x and rule.draws else None,
        saved if _reads_saved(activation, need_x, need_w, need_b, need_feedback) else None,
    )
    ctx.layer = (activation, negative_slope, rule, x_shape)  # one attribute: each costs a fraction of a µs


def weight_and_feedback_grads(grad_w, need_w: bool, need_feedback: bool) -> tuple:
    """(W's gradient, B's gradient), each None unless wanted: kp's B gradient is W's, given as a
    tensor of its own. Returned twice as one tensor, autograd copies it for one of the two — but
    not when each reaches its parameter through a view with the parameter's layout (parameters
    viewing one flat buffer, a vmap's movedim), and then weight.grad and feedback.grad would
    share one storage (a second backward adding into both, clipping one clipping both)."""
    if need_w and need_feedback:
        return grad_w, grad_w.clone()
    return (grad_w if need_w else None), (grad_w if need_feedback else None)


def fa_backward(ctx, grad_y, backend: Backend) -> tuple:
    """(grad_x, grad_W, grad_b, grad_B) of the FA layer from what :func:`save_for_fa_backward`
    kept on ``ctx``, each None unless ``ctx.needs_input_grad`` asks for it; grad_B
    (Kolen–Pollack: B's gradient is W's) only when the rule trains B. The backward of every
    path: the Functions below and ``library.py``'s ops.

    2-D throughout: grad_y and saved [M, N], x [M, K] (an input of other than 2 dimensions is
    flattened here, and grad_x given back in its shape), weight and feedback [N, K]; the stacked
    ops' tensors have the models first. δ = g ⊙ f'(z) and grad_b are formed once, in one pass
    (``backend.local_error``); both GEMMs read that δ. Once differentiable, as
    :func:`once_differentiable` makes a backward, checked here rather than by a wrapper: a frame
    less on every backward.
    """
    if torch.is_grad_enabled():  # create_graph=True: a second backward through this one is an error
        return _fa_backward_once(ctx, grad_y, backend)
    x, weight, feedback, counter, saved = ctx.saved_tensors
    need_x, need_w, need_b, need_feedback = ctx.needs_input_grad[:4]
    activation, negative_slope, rule, x_shape = ctx.layer
    if x_shape is not None:
        grad_y = grad_y.reshape(-1, grad_y.shape[-1])
        saved = None if saved is None else saved.reshape(grad_y.shape)
        x = None if x is None else x.reshape(-1, x.shape[-1])
    need_feedback = need_feedback and rule.trains_feedback
    need_grad_w = need_w or need_feedback
    delta, grad_b = backend.local_error(grad_y, saved, activation, negative_slope, need_x or need_grad_w, need_b)
    grad_x = None
    if need_x:
        grad_x = backend.backward_input(delta, feedback, weight, counter, rule)
        if x_shape is not None:
            grad_x = grad_x.view(x_shape)
    grad_w = backend.backward_weight(delta, x) if need_grad_w else None
    if need_feedback:  # kp: B's gradient is W's
        grad_w, grad_feedback = weight_and_feedback_grads(grad_w, need_w, need_feedback)
        return grad_x, grad_w, grad_b, grad_feedback
    return grad_x, grad_w, grad_b, None


_fa_backward_once = _torch_once_differentiable(fa_backward)  # under no_grad fa_backward takes its plain path


# The Functions' last four inputs (counter, activation, negative_slope, rule) take no gradient.
_NO_GRADS = (None, None, None, None)


def _store_extra(ctx, activation: str, negative_slope: float, rule: FeedbackRule) -> bool:
    """Whether the forward stores the extra tensor (``saves_extra``) because backward reads it (a set
    test first: for most activations that is all it costs)."""
    return activation in MAY_SAVE_EXTRA and saves_extra(activation, negative_slope) and needs_saved(ctx, activation,
                                                                                                   rule)


def _forward_2d(ctx, backend: Backend, x, weight, bias, feedback, counter, activation, negative_slope, rule):
    """The forward of a backend that writes y into a given [M, N] tensor (the kernels): for an x
    of other than 2 dimensions y is allocated in its final shape, so that the returned tensor is
    not a view (views made inside a Function cannot be modified in place), and x is flattened by
    a view whenever its strides allow (the kernels take any strides, so only un-viewable layouts
    are copied); a 2-D x's y is the backend's own (no given tensor to check)."""
    store_extra = _store_extra(ctx, activation, negative_slope, rule)
    if x.dim() == 2:
        x2d, x_shape = x, None
        y, extra = backend.forward(x, weight, bias, activation, negative_slope, store_extra)
    else:
        out_features = weight.shape[0]
        x2d, x_shape = x.reshape(-1, x.shape[-1]), x.shape
        y = x.new_empty(*x.shape[:-1], out_features)  # the sizes as ints: cheaper than a tuple
        _, extra = backend.forward(x2d, weight, bias, activation, negative_slope, store_extra,
                                   y.view(-1, out_features))
    save_for_fa_backward(ctx, x2d, weight, feedback, counter, y if extra is None else extra, activation,
                         negative_slope, rule, x_shape)
    return y


def _forward_nd(ctx, backend: Backend, x, weight, bias, feedback, counter, activation, negative_slope, rule):
    """The forward of a backend that takes x [..., K] as it is (the reference: F.linear)."""
    store_extra = _store_extra(ctx, activation, negative_slope, rule)
    y, extra = backend.forward(x, weight, bias, activation, negative_slope, store_extra)
    save_for_fa_backward(ctx, x, weight, feedback, counter, y if extra is None else extra, activation, negative_slope,
                         rule, None if x.dim() == 2 else x.shape)
    return y


class FALinearFunction(torch.autograd.Function):
    """Feedback-alignment linear layer on the fused Triton kernels.

    Inputs: x [..., K], weight [N, K], bias [N] or None, feedback [N, K] or None (as ``rule``
    needs), counter (brsf's draw, int64 [1]) or None, activation, negative_slope, rule
    -> y [..., N]. Backward: grad_x = δ B, grad_W = δᵀ x, grad_b = Σ_rows δ with δ = g ⊙ f'(z);
    feedback gets grad_W when the rule trains it (kp), else none. Inputs are not checked here:
    ``fa_triton.fa_linear`` and ``FALinear`` check them.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, feedback, counter, activation, negative_slope, rule):
        return _forward_2d(ctx, TRITON, x, weight, bias, feedback, counter, activation, negative_slope, rule)

    @staticmethod
    def backward(ctx, grad_y):  # once differentiable: fa_backward checks
        return fa_backward(ctx, grad_y, TRITON) + _NO_GRADS


class ReferenceFALinearFunction(torch.autograd.Function):
    """The same layer in plain PyTorch ops (the ``"torch"`` backend): the CPU path, float64
    included, and the baseline of the benchmarks. Same inputs, outputs and gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback, counter, activation, negative_slope, rule):
        return _forward_nd(ctx, TORCH, x, weight, bias, feedback, counter, activation, negative_slope, rule)

    @staticmethod
    def backward(ctx, grad_y):  # once differentiable: fa_backward checks
        return fa_backward(ctx, grad_y, TORCH) + _NO_GRADS


def _forward_auto(ctx, backend: Backend, x, weight, bias, feedback, counter, activation, negative_slope, rule):
    """The forward of ``backend="auto"`` (``backend`` is AUTO): on whichever of the kernels and
    the reference was faster for it on this GPU (``fa_triton.ops.backends.auto``)."""
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    store_extra = _store_extra(ctx, activation, negative_slope, rule)
    chosen = backend.forward.backend_for(x2d, weight, bias, activation, negative_slope, store_extra)
    forward = _forward_2d if chosen.name == "triton" else _forward_nd
    return forward(ctx, chosen, x, weight, bias, feedback, counter, activation, negative_slope, rule)


class AutoFALinearFunction(torch.autograd.Function):
    """The same layer with ``backend="auto"``: each step on whichever of the kernels and the
    reference was faster for it on this GPU (``fa_triton.ops.backends.auto``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback, counter, activation, negative_slope, rule):
        return _forward_auto(ctx, AUTO, x, weight, bias, feedback, counter, activation, negative_slope, rule)

    @staticmethod
    def backward(ctx, grad_y):  # once differentiable: fa_backward checks
        return fa_backward(ctx, grad_y, AUTO) + _NO_GRADS


TRITON.function = FALinearFunction
TORCH.function = ReferenceFALinearFunction
AUTO.function = AutoFALinearFunction
# The forward of each backend's Functions: the kernels write y into a given 2-D tensor.
_FORWARDS = {"triton": _forward_2d, "torch": _forward_nd, "auto": _forward_auto}


class LayerFunction(torch.autograd.Function):
    """The Functions above for one layer's eager calls (``FALinear``'s fast path, see
    :func:`eager_runner`): x, weight, bias, feedback and counter as they take them, then
    ``call``, the layer's (activation, negative_slope, rule, steps, forward): the steps are the
    layer's own on Triton (``LayerSteps``, which keep their launch plans) and on "auto"
    (``AutoLayerSteps``, which keep auto's choices too), the reference backend's otherwise, and
    forward is the backend's (:data:`_FORWARDS`). The same forward and :func:`fa_backward` as the
    Functions above, with six inputs instead of eight (each input costs the call some host time)."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback, counter, call):
        activation, negative_slope, rule, steps, forward = call
        ctx.steps = steps
        return forward(ctx, steps, x, weight, bias, feedback, counter, activation, negative_slope, rule)

    @staticmethod
    def backward(ctx, grad_y):  # once differentiable: fa_backward checks
        return fa_backward(ctx, grad_y, ctx.steps) + _NO_LAYER_GRADS


_NO_LAYER_GRADS = (None, None)  # LayerFunction's counter and call


# ------------------------------------------------------------------------- the entry

@torch.compiler.assume_constant_result
def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for ``device_type``, or None outside an autocast region.

    Dynamo cannot trace ``torch.amp.is_autocast_available`` on every torch version (torch 2.11
    fails on it), so this is evaluated while tracing and its result kept as a constant; the
    autocast state is part of Dynamo's global guards, so a change of it recompiles.
    """
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_inputs(x, weight, bias, feedback):
    """x, weight, bias, feedback cast as ``torch.autocast`` casts ``F.linear``'s arguments.

    Inside an autocast region for x's device type, floating-point tensors other than float64
    are cast to the autocast dtype (the casts are differentiable: fp32 master weights get fp32
    gradients); outside one, they are returned unchanged.
    """
    # One C call when no autocast is on anywhere (the common case); Dynamo folds it to a constant.
    if not torch._C._is_any_autocast_enabled() or not isinstance(x, torch.Tensor):
        return x, weight, bias, feedback
    dtype = _autocast_dtype(x.device.type)
    if dtype is None:
        return x, weight, bias, feedback

    def cast(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
            return t.to(dtype)
        return t

    return cast(x), cast(weight), cast(bias), cast(feedback)


FORWARD_MODE = (
    "fa_triton's layers define no forward-mode derivative (torch.func.jvp, jacfwd): feedback alignment "
    "replaces only the backward pass's W by B, so a tangent would be neither the true one (through W) "
    "nor FA's; use reverse mode (grad, vjp, jacrev)")

STACKED_BRSF = (
    "method='brsf' under torch.func.vmap over stacked models: each model's Philox seed is a Python int "
    "(feedback_seed), which stack_module_state cannot stack, so every member would draw the first model's R; "
    "train brsf models one by one (vmap over the data alone works)")


_VMAP, _JVP, _FUNCTIONALIZE = (torch._C._functorch.TransformType.Vmap, torch._C._functorch.TransformType.Jvp,
                                torch._C._functorch.TransformType.Functionalize)


def _transforms() -> list:
    """The kinds of the enclosing ``torch.func`` transforms, outermost first."""
    return [level.key() for level in torch._C._functorch.get_interpreter_stack() or ()]


# brsf's draw numbers as ops whose vmap rule refuses a counter batched by stacked models
# (STACKED_BRSF), eagerly and while tracing (Dynamo cannot trace functorch's tensor wrappers, so
# no Python check can read them there).

@torch.library.custom_op("fa_triton::next_draw", mutates_args=("counter",))
def _next_draw(counter: torch.Tensor) -> torch.Tensor:
    counter.add_(1)
    return counter.clone()


@torch.library.custom_op("fa_triton::unstacked_draw", mutates_args=())
def unstacked_draw(counter: torch.Tensor) -> torch.Tensor:
    """brsf's draw number as the aten form (:func:`transformable`) reads it: a copy."""
    return counter.clone()


def _refuse_stacked(info, in_dims, counter):
    raise ValueError(STACKED_BRSF)


for _draw_op in (_next_draw, unstacked_draw):
    _draw_op.register_fake(torch.empty_like)
    _draw_op.register_vmap(_refuse_stacked)


def next_draw(counter: torch.Tensor) -> torch.Tensor:
    """brsf's draw number for this training forward: ``counter`` advanced in place, and its new
    value as a tensor of its own (the backward's). Eagerly two ops; while tracing one opaque op:
    traced through, AOT autograd's partitioner recomputed the value in the backward from the
    already-advanced buffer, which gave the next draw's number (``counter`` + 2). Under a vmap
    the op too, so that stacked models are refused before any counter moves (not under
    functionalize, which takes no custom op that mutates its input); under forward mode the
    layer is refused here, before the draw."""
    if torch.compiler.is_compiling():
        return _next_draw(counter)
    if torch._C._are_functorch_transforms_active():
        kinds = _transforms()
        if _JVP in kinds:
            raise NotImplementedError(FORWARD_MODE)
        if _VMAP in kinds and _FUNCTIONALIZE not in kinds:
            return _next_draw(counter)
    counter.add_(1)
    return counter.clone()


# Both read functorch's interpreter stack, which Dynamo cannot trace: under torch.compile of a
# vmapped function they are evaluated while tracing (the transforms are those of the traced
# code, fixed in its graph).
@torch.compiler.assume_constant_result
def _one_vmap() -> bool:
    """Whether the only enclosing ``torch.func`` transform is one vmap (no grad, jvp or
    functionalize, no vmap inside another: the stacked ops have no vmap rule of their own)."""
    return _transforms() == [_VMAP]


@torch.compiler.assume_constant_result
def _forward_mode() -> bool:
    """Whether a forward-mode transform (jvp, jacfwd) encloses this call."""
    return _JVP in _transforms()


def transformable(op, x, weight, bias, feedback, counter, activation: str, negative_slope: float,
                  rule: FeedbackRule) -> torch.Tensor:
    """The layer in differentiable PyTorch ops, for ``torch.func`` transforms (vmap, grad,
    jacrev: ``torch.func.stack_module_state`` + ``functional_call`` trains many seeds in one
    pass), where the autograd Functions cannot run. ``op(x, weight, bias)`` is ``F.linear`` (or
    a convolution); z = op(x, W, b) with x's gradient sent through B instead of W by the term
    op(x, B) - op(x, B).detach() (0 in value wherever op(x, B) is finite: then y is the
    Functions' y), so autograd gives grad_x = δ B, grad_W = δᵀ x, grad_b = Σ δ and, for kp, B's
    gradient = W's. One more GEMM (or convolution) than the Functions; y = f(z). Forward mode
    (jvp) is refused, as the Functions refuse it."""
    if _forward_mode():
        raise NotImplementedError(FORWARD_MODE)
    if rule.method == "brsf":
        counter = unstacked_draw(counter)
    if rule.method == "backprop":
        z = op(x, weight, bias)
    else:
        feedback = feedback_matrix(rule, weight.detach(), feedback, counter)
        through_feedback = op(x, feedback, None)
        z = op(x.detach(), weight, bias) + (through_feedback - through_feedback.detach())
    return apply_activation(z, activation, negative_slope)


def _plain_backprop(x, weight, bias, feedback, counter, call) -> torch.Tensor:
    """Backprop (B = W) on the reference backend: ``F.linear`` and the activation under
    PyTorch's own autograd, which is that rule exactly and costs less per call than any Python
    Function (the nn.Linear a user compares with). ``call``: (activation, negative_slope, ...)."""
    return apply_activation(F.linear(x, weight, bias), call[0], call[1])


def eager_runner(backend: Backend, rule: FeedbackRule, activation: str, negative_slope: float) -> tuple:
    """(run, call) for one layer's eager calls on a resolved backend: ``run(x, weight, bias,
    feedback, counter, call)`` is :class:`LayerFunction`'s apply, or for backprop on the
    reference :func:`_plain_backprop`; ``call`` binds the activation, the rule and, on Triton and
    "auto", steps of the layer's own that keep their launch plans and auto's choices
    (``LayerSteps``, ``AutoLayerSteps``). Make a new one whenever any of these, or the layer's
    tensors, change."""
    if rule.method == "backprop" and backend is TORCH:
        return _plain_backprop, (activation, negative_slope)
    steps = LayerSteps() if backend is TRITON else AutoLayerSteps() if backend is AUTO else backend
    return LayerFunction.apply, (activation, negative_slope, rule, steps, _FORWARDS[backend.name])


def _run_eager(backend: Backend, x, weight, bias, feedback, counter, activation: str, negative_slope: float,
               rule: FeedbackRule) -> torch.Tensor:
    """The layer in eager mode on a resolved backend, for one call: its autograd Function, or
    for backprop on the reference :func:`_plain_backprop`."""
    if rule.method == "backprop" and backend is TORCH:
        return _plain_backprop(x, weight, bias, feedback, counter, (activation, negative_slope))
    return backend.function.apply(x, weight, bias, feedback, counter, activation, negative_slope, rule)


def apply_checked(x, weight, bias, feedback, counter, activation: str, negative_slope: float, rule: FeedbackRule,
                  backend: str) -> torch.Tensor:
    """The layer on inputs already checked (and autocast): the resolved backend's autograd
    Function in eager mode (:func:`eager_runner`), its ``torch.library`` op while tracing."""
    if torch._C._are_functorch_transforms_active():
        if _one_vmap():
            resolved = resolve(backend, x)
            if resolved is not TORCH:
                # The kernels' op, whose vmap rule runs E models in one stacked launch per job
                # (fa_triton.ops.library); plain autograd outside the vmap runs its backward.
                return resolved.layer_op(x, weight, bias, feedback, counter, activation, negative_slope, rule)
        # grad, jacrev, nested vmaps (and vmap on the reference): the Functions have no torch.func form; the
        # same layer in aten ops has (vmap batches them: bmm).
        return transformable(F.linear, x, weight, bias, feedback, counter, activation, negative_slope, rule)
    resolved = resolve(backend, x)
    if torch.compiler.is_compiling() and resolved.name != "torch":
        # torch.compile / torch.export trace the kernels' torch.library ops (one graph node
        # each, no graph break). The reference's Function is traced through: its plain aten ops
        # are what Inductor fuses. Eager mode keeps the autograd Functions: they cost less per call.
        return resolved.layer_op(x, weight, bias, feedback, counter, activation, negative_slope, rule)
    return _run_eager(resolved, x, weight, bias, feedback, counter, activation, negative_slope, rule)
