"""Launchers of the feedback-alignment linear kernels (``linear_kernels.py``, ``pass_kernels.py``).

Shapes (nn.Linear's layout)::

    fa_linear_forward:          x [M, K], weight [N, K], bias [N]      -> y [M, N] (and the extra tensor)
    fa_linear_local_error:      grad_y, saved [M, N]                   -> δ [M, N], grad_b [N]
    fa_linear_feedback:         weight [N, K] (and R, or the draw)     -> B [N, K] of a sign rule
    fa_linear_backward_input:   grad_y, saved [M, N], B [N, K]         -> grad_x [M, K] (and δ)
    fa_linear_backward_weight:  grad_y, saved [M, N], x [M, K]         -> grad_W [N, K], grad_b [N]
    fa_linear_dfa_delta:        e [M, n_out], B [n_out, N], saved      -> δ [M, N]
    fa_mlp_forward:             x [M, K], W_l [N_l, N_l-1], b_l        -> [y_1 … y_L] of a narrow chain, one launch
    fa_mlp_backward:            g [M, N_L], y_l, B_l                   -> [δ_1 … δ_L], grad_b_l, grad_x: its δ chain
    fa_mlp_weight_grads:        δ_l [M, N_l], h_{l-1} [M, K_l]         -> every grad_W_l, one grouped launch
    fa_stacked_*:               the forward, δ pass, B, and both backward GEMMs of E models [E, ...] in one
                                launch each (E seeds of one network under torch.func.vmap)

The two backward launchers take g and form δ = g ⊙ f'(z) by the δ pass first (skipped when f
is the identity and nothing else is asked of it); the layer's autograd runs the pass once and
gives both GEMMs δ with ``activation="identity"``. A GEMM call is one dictionary lookup of a
cached launch plan (``plans.py``) plus Triton's own launch. Any input strides work; Wᵀ and δᵀ
are read through strides and nothing is transposed or copied.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from . import linear_kernels as gemm
from . import mlp_kernels as mlp
from . import pass_kernels as passes
from . import plans, tuning
from .plans import (
    PLANS,
    BackwardInputPlan,
    BackwardWeightPlan,
    DFAPlan,
    ForwardPlan,
    GemmKey,
    Launch,
    Plan,
    cdiv,
    check_out,
    clear_plans,
    on_device,
    remember,
    split_sum,
)
from .tuning import LaunchConfig, as_config

__all__ = [
    "ACTIVATIONS",
    "METHODS",
    "INTERPRETED",
    "JIT_KERNELS",
    "LaunchConfig",
    "fa_linear_forward",
    "fa_linear_local_error",
    "fa_linear_feedback",
    "fa_linear_backward_input",
    "fa_linear_backward_weight",
    "fa_linear_dfa_delta",
    "fa_mlp_forward",
    "fa_mlp_backward",
    "fa_mlp_weight_grads",
    "fa_stacked_forward",
    "fa_stacked_local_error",
    "fa_stacked_feedback",
    "fa_stacked_backward_input",
    "fa_stacked_backward_weight",
    "mlp_fusable",
    "mlp_backward_fusable",
    "clear_plans",
]

#: The activations the kernels apply (``fa_triton.ACTIVATIONS``; a test checks they agree).
ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu", "identity")
#: The FA family's methods (``fa_triton.METHODS``; a test checks they agree). usf, frsf and brsf
#: form B from W's sign; for the others the feedback tensor is B (W itself for backprop).
METHODS = ("fa", "backprop", "usf", "frsf", "brsf", "kp", "wm")
SIGN_METHODS = ("usf", "frsf", "brsf")
# The names the launchers took before B's rule was called by its method.
_FEEDBACK_MODES = {"matrix": "fa", "sign": "usf", "magnitude_sign": "frsf", "random_sign": "brsf"}


def _method(method: str, feedback_mode: str | None) -> str:
    if feedback_mode is not None:
        warnings.warn("feedback_mode= is deprecated: pass method= (one of fa_triton.METHODS)", DeprecationWarning,
                      stacklevel=3)
        if feedback_mode not in _FEEDBACK_MODES:
            raise ValueError(f"feedback_mode must be one of {tuple(_FEEDBACK_MODES)}, got {feedback_mode!r}")
        method = _FEEDBACK_MODES[feedback_mode]
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method
#: Every ``@triton.jit`` kernel the launchers run, by name (tests and benchmarks record or stub
#: a launch by replacing the kernel's ``run``).
JIT_KERNELS = {name: getattr(module, name) for module, names in (
    (gemm, ("forward_kernel", "forward_tma_kernel", "forward_split_epilogue_kernel", "backward_input_kernel",
            "backward_input_tma_kernel", "backward_weight_kernel", "backward_weight_tma_kernel", "dfa_delta_kernel")),
    (passes, ("local_error_kernel", "feedback_kernel", "split_sum_kernel")),
    (mlp, ("mlp_forward_kernel", "mlp_backward_kernel", "mlp_weight_grad_kernel"))) for name in names}
# @triton.jit picks the interpreter when the module is imported with TRITON_INTERPRET=1.
INTERPRETED = type(gemm.forward_kernel).__name__ == "InterpretedFunction"


def _check_shape(t: torch.Tensor | None, shape: tuple, name: str) -> None:
    # Kernels read operands by the sizes of the others: a misfit would read out of bounds.
    if t is not None and t.shape != shape:  # torch.Size is a tuple: no copy to compare
        raise ValueError(f"{name} must have shape {shape} to fit the other operands, got {tuple(t.shape)}")


def _check_activation(activation) -> None:
    # A misspelt name must not run as the identity (the kernels' last branch).
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


# A typed key built without the NamedTuple's Python-level __new__ (half the cost; the keys
# are built at every call).
_new = tuple.__new__


# ----------------------------------------------------------------------------------- forward

def fa_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    negative_slope: float = 0.0,
    store_extra: bool = False,
    out: torch.Tensor | None = None,
    *,
    config: LaunchConfig | dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused ``y = f(x Wᵀ + b)``.

    Args: x [M, K] (any strides), weight [N, K], bias [N] or None; ``store_extra``: also
    store the tensor backward reads besides y (``fa_triton.activations.saves_extra``: z, or
    f'(z) for gelu); ``out``, an optional [M, N] tensor of x's dtype to write y into;
    ``config``, a :class:`LaunchConfig` (or a dict of its fields) to use instead of the tuned
    one (tests and experiments).
    Returns: y [M, N], and the extra tensor [M, N] (y's strides) when ``store_extra`` (else None).
    """
    _check_activation(activation)
    M, K = x.shape
    N = weight.shape[0]
    _check_shape(weight, (N, K), "weight")
    _check_shape(bias, (N,), "bias")
    if out is None:
        # new_empty with the sizes as separate ints: about 0.5 µs a call cheaper than with a tuple,
        # and cheaper than torch.empty(device=, dtype=) (the launchers below allocate the same way).
        y = x.new_empty(M, N)
    else:
        check_out(out, (M, N), x, "out")
        y = out
    extra = torch.empty_strided((M, N), y.stride(), device=x.device, dtype=x.dtype) if store_extra else None
    if M == 0 or N == 0:
        return y, extra
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()  # the kernels read bias with a unit stride (an expanded one included)
    key = forward_key(x, weight, bias, y, activation, store_extra, config)
    args = (x, weight, bias, y, extra, float(negative_slope))
    plan = PLANS.get(key)
    if plan is None:
        plan = ForwardPlan.build(key, args)
    plan.run(*args)
    return y, extra


def forward_key(x, weight, bias, y, activation: str, store_extra: bool, config=None) -> GemmKey:
    """The key of the forward's plan (``plans.PLANS``) for operands that passed its checks:
    ``plan.run(x, weight, bias, y, extra, negative_slope)`` runs it."""
    (M, K), N = x.shape, weight.shape[0]
    return _new(GemmKey, ("forward", x.device, x.dtype, weight.dtype, M, N, K, x.stride(), weight.stride(),
                          y.stride(), (bias is None, activation, store_extra), plans.dot_precision(x.dtype),
                          None if config is None else as_config(config)))


# ------------------------------------------------------------------------------- local error

def fa_linear_local_error(
    grad_y: torch.Tensor,
    saved: torch.Tensor | None,
    activation: str,
    negative_slope: float = 0.0,
    *,
    store_delta: bool = True,
    bias_grad: bool = True,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    config: LaunchConfig | dict | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The δ pass: ``δ = g ⊙ f'(z)`` and ``grad_b = Σ_rows δ`` in one read of g and saved.

    Args: grad_y [M, N] (any strides), saved [M, N] (y or the extra tensor; None for identity);
    ``store_delta``: write δ (in ``dtype``, default grad_y's; contiguous, or into ``out`` if
    given, which must have a unit column stride); ``bias_grad``: also grad_b [N] in
    that dtype, summed from δ in fp32 before its rounding, in a fixed order; ``config``:
    block_rows × block_cols tiles and ``split`` row slices (block_red is not used).
    Returns (δ or None, grad_b or None).
    """
    _check_activation(activation)
    M, N = grad_y.shape
    _check_shape(saved, (M, N), "saved")
    dtype = grad_y.dtype if dtype is None else dtype
    delta = None
    if store_delta:
        delta = grad_y.new_empty(M, N, dtype=dtype) if out is None else out
        if out is not None:
            check_out(out, (M, N), delta, "out")
            if out.stride(1) != 1 and N > 1:
                raise ValueError(f"out must have a unit column stride, got strides {out.stride()}")
    grad_b = grad_y.new_empty(N, dtype=dtype) if bias_grad else None
    if M == 0 or N == 0 or not (store_delta or bias_grad):
        if grad_b is not None:
            grad_b.zero_()
        return delta, grad_b
    saved_arg = grad_y if saved is None else saved
    delta_arg = grad_y if delta is None else delta
    key = local_error_key(grad_y, saved_arg, delta_arg, dtype, activation, store_delta, bias_grad, config)
    plan = PLANS.get(key)
    if plan is None:
        plan = _local_error_plan(key, grad_y, saved, delta)
    plan.run(grad_y, saved_arg, delta_arg, grad_b, float(negative_slope))
    return delta, grad_b


def local_error_key(grad_y, saved_arg, delta_arg, dtype: torch.dtype, activation: str, store_delta: bool,
                    bias_grad: bool, config=None) -> PassKey:
    """The key of the δ pass's plan for operands that passed its checks (``saved_arg``: saved, or
    grad_y for the identity; ``delta_arg``: δ, or grad_y when δ is not stored; ``dtype``: δ's and
    grad_b's): ``plan.run(grad_y, saved_arg, delta_arg, grad_b or None, negative_slope)`` runs it."""
    M, N = grad_y.shape
    return _new(PassKey, (grad_y.device, grad_y.dtype, saved_arg.dtype, dtype, M, N, grad_y.stride(),
                          saved_arg.stride(), delta_arg.stride(), activation, store_delta, bias_grad,
                          None if config is None else as_config(config)))


class PassKey(NamedTuple):
    """What decides the δ pass's launch: device, dtypes (g, saved, δ), sizes, strides, flags, config."""

    device: torch.device
    dtype: torch.dtype
    saved_dtype: torch.dtype
    delta_dtype: torch.dtype
    M: int
    N: int
    g: tuple
    saved: tuple
    delta: tuple
    activation: str
    store_delta: bool
    bias_grad: bool
    config: LaunchConfig | None


def _local_error_plan(key: PassKey, grad_y, saved, delta) -> Plan:
    """The δ pass's plan for ``key``, remembered: with grad_b over more than one row slice, fp32
    partial sums per slice added in order (``split_sum``)."""
    M, N = key.M, key.N
    cfg = key.config or tuning.pass_config(M, N, tuning.sm_count(key.device), INTERPRETED)
    # With grad_b, every slice holds rows (its partial sums are added); without, slices only
    # spread the rows over more programs.
    split = min(cfg.split, cdiv(M, cfg.block_rows))
    rows_per_split = cdiv(cdiv(M, split), cfg.block_rows) * cfg.block_rows
    splits = cdiv(M, rows_per_split)
    launch = on_device(grad_y, Launch(passes.local_error_kernel, (cdiv(N, cfg.block_cols), splits), dict(
        ACTIVATION=key.activation, STORE_DELTA=key.store_delta, BIAS_GRAD=key.bias_grad,
        USE_INT64=plans.needs_int64(grad_y, saved, delta), STACKED=False, BLOCK_M=cfg.block_rows,
        BLOCK_N=cfg.block_cols, num_warps=cfg.num_warps)))
    strides = (0, *key.g, 0, *key.saved, 0, *key.delta, 0)  # one model: no model strides

    def run(grad_y, saved_arg, delta_arg, grad_b, slope):
        if grad_b is None or splits == 1:
            launch(grad_y, saved_arg, delta_arg, grad_y if grad_b is None else grad_b, M, N, rows_per_split,
                   *strides, slope)
            return
        partial = torch.empty((splits, N), device=grad_y.device, dtype=torch.float32)
        launch(grad_y, saved_arg, delta_arg, partial, M, N, rows_per_split, *strides, slope)
        split_sum(partial, grad_b, splits)

    plan = Plan(cfg, run)
    remember(key, plan)
    return plan


# ---------------------------------------------------------------------------------- feedback

def fa_linear_feedback(
    weight: torch.Tensor,
    feedback: torch.Tensor | None,
    method: str,
    *,
    feedback_scale: float = 1.0,
    seed: int = 0,
    counter: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """B [N, K] (contiguous, W's dtype) of a method that forms it from W's sign
    (``fa_triton.rules.methods``): "usf": ``feedback_scale``·sign(W); "frsf": |``feedback``|·sign(W);
    "brsf": |R|·sign(W), |R| = ``feedback_scale``·U(0, 1) drawn by Philox from ``seed`` and the
    draw number in ``counter`` (int64 [1], read on the device). The magnitude is fp32 and the
    result rounded once to W's dtype, as ``feedback_matrix`` does.
    """
    if method not in SIGN_METHODS:
        raise ValueError(f"method must be one of {SIGN_METHODS} to form B from W's sign, got {method!r}")
    if method == "frsf" and feedback is None:
        raise ValueError("method='frsf' needs feedback (the magnitudes R)")
    if method == "brsf" and (counter is None or counter.numel() != 1 or counter.dtype != torch.int64):
        raise ValueError("method='brsf' needs counter, an int64 tensor of one element")
    N, K = weight.shape
    if method == "frsf":
        _check_shape(feedback, (N, K), "feedback")
    if out is None:
        out = weight.new_empty(N, K)
    elif not out.is_contiguous():
        raise ValueError(f"out must be contiguous, got strides {out.stride()}")
    if N == 0 or K == 0:
        return out
    feedback_arg = weight if feedback is None else feedback
    block_n, block_k = (64, 64) if INTERPRETED else (32, 128)
    launch = Launch(passes.feedback_kernel, (cdiv(N, block_n), cdiv(K, block_k)), dict(
        METHOD=method, USE_INT64=plans.needs_int64(weight, feedback, out), STACKED=False, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=4))
    on_device(weight, launch)(weight, feedback_arg, out if counter is None else counter, out, N, K, 0, *weight.stride(),
                              0, *feedback_arg.stride(), 0, float(feedback_scale), seed)  # one model
    return out


# ---------------------------------------------------------------------------- backward input

def fa_linear_backward_input(
    grad_y: torch.Tensor,
    saved: torch.Tensor | None,
    feedback: torch.Tensor | None,
    activation: str,
    negative_slope: float = 0.0,
    *,
    config: LaunchConfig | dict | None = None,
    delta_out: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    method: str = "fa",
    weight: torch.Tensor | None = None,
    feedback_scale: float = 1.0,
    seed: int = 0,
    counter: torch.Tensor | None = None,
    feedback_mode: str | None = None,
) -> torch.Tensor:
    """``grad_x = (g ⊙ f'(z)) B``: the δ pass (unless f is the identity), then the GEMM δ B.

    Args: grad_y [M, N], saved [M, N] (y or the extra tensor, see ``saves_extra``; None
    for identity); B [N, K] as ``method`` forms it: ``feedback`` itself (any strides) for fa,
    backprop, kp and wm; for usf, frsf and brsf formed by :func:`fa_linear_feedback` from
    ``weight`` (and ``feedback``, ``feedback_scale``, ``seed``, ``counter``) into a buffer for
    this call only (``feedback_mode=``, the older name of the rule, is deprecated).
    ``delta_out``, an optional [M, N] tensor of B's dtype with unit column stride into which δ
    is written; ``out``, an optional [M, K] tensor for grad_x; ``config`` as in
    :func:`fa_linear_forward` (for the GEMM).
    Returns grad_x [M, K] (contiguous unless ``out`` says otherwise), in B's dtype.
    """
    _check_activation(activation)
    if feedback_mode is not None or method not in METHODS:
        method = _method(method, feedback_mode)
    forms_b = method in SIGN_METHODS
    if not forms_b and feedback is None:
        raise ValueError(f"method={method!r} needs feedback (B)")
    if forms_b and weight is None:
        raise ValueError(f"method={method!r} needs weight (B is formed from its sign)")
    source = weight if forms_b else feedback
    M, N = grad_y.shape
    K = source.shape[1]
    _check_shape(source, (N, K), "weight" if forms_b else "feedback")
    _check_shape(saved, (M, N), "saved")
    if out is None:
        grad_x = source.new_empty(M, K)
    else:
        check_out(out, (M, K), source, "out")
        grad_x = out
    if delta_out is not None:
        check_out(delta_out, (M, N), source, "delta_out")
        if delta_out.stride(1) != 1 and N > 1:
            raise ValueError(f"delta_out must have a unit column stride, got strides {delta_out.stride()}")
    delta = grad_y
    if activation != "identity" or delta_out is not None or grad_y.dtype != source.dtype:
        delta, _ = fa_linear_local_error(grad_y, saved, activation, negative_slope, bias_grad=False,
                                         dtype=source.dtype, out=delta_out)
    if M == 0 or K == 0:
        return grad_x
    if forms_b:
        feedback = fa_linear_feedback(weight, feedback, method, feedback_scale=feedback_scale, seed=seed,
                                      counter=counter)
    key = backward_input_key(delta, feedback, grad_x, config)
    args = (delta, feedback, grad_x)
    plan = PLANS.get(key)
    if plan is None:
        plan = BackwardInputPlan.build(key, args)
    plan.run(*args)
    return grad_x


def backward_input_key(delta, feedback, grad_x, config=None) -> GemmKey:
    """The key of the GEMM δ B's plan for operands that passed its checks (δ in B's dtype, B as
    the rule formed it): ``plan.run(delta, feedback, grad_x)`` runs it."""
    (M, N), K = delta.shape, feedback.shape[1]
    return _new(GemmKey, ("backward_input", delta.device, feedback.dtype, delta.dtype, M, N, K, delta.stride(),
                          feedback.stride(), grad_x.stride(), (), plans.dot_precision(feedback.dtype),
                          None if config is None else as_config(config)))


# --------------------------------------------------------------------------- backward weight

def fa_linear_backward_weight(
    grad_y: torch.Tensor,
    saved: torch.Tensor | None,
    x: torch.Tensor,
    activation: str,
    negative_slope: float = 0.0,
    bias_grad: bool = True,
    *,
    split_k: int | None = None,
    config: LaunchConfig | dict | None = None,
    out: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``grad_W = δᵀ x`` and ``grad_b = Σ_rows δ`` with ``δ = g ⊙ f'(z)``.

    The δ pass (also grad_b) runs first unless f is the identity and grad_b is not wanted.
    Args: grad_y [M, N] (δ itself with ``activation="identity"``), saved [M, N] or None
    (identity), x [M, K]; ``split_k``, at most this many batch slices reduced by separate
    programs and then summed in a fixed order (None: the config's; 1: no split); ``config``
    as in :func:`fa_linear_forward` (for the GEMM); ``out``, optional (grad_W [N, K]
    contiguous, grad_b [N] or None) to write into.
    Returns: grad_W [N, K] and grad_b [N] (None unless ``bias_grad``), in x's dtype.
    """
    _check_activation(activation)
    if split_k is not None and (isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"split_k must be None or an int >= 1, got {split_k!r}")
    M, N = grad_y.shape
    K = x.shape[1]
    _check_shape(x, (M, K), "x")
    _check_shape(saved, (M, N), "saved")
    if out is None:
        grad_w = x.new_empty(N, K)
        grad_b_out = None
    else:
        grad_w, grad_b_out = out
        check_out(grad_w, (N, K), x, "out[0]")
        if not grad_w.is_contiguous():
            raise ValueError(f"out[0] (grad_W) must be contiguous, got strides {grad_w.stride()}")
        if bias_grad:
            check_out(grad_b_out, (N,), x, "out[1]")
            if grad_b_out.stride(0) != 1 and N > 1:
                raise ValueError(f"out[1] (grad_b) must have a unit stride, got stride {grad_b_out.stride()}")
    delta, grad_b = grad_y, None
    if activation != "identity" or bias_grad or grad_y.dtype != x.dtype:
        store = activation != "identity" or grad_y.dtype != x.dtype
        delta, grad_b = fa_linear_local_error(grad_y, saved, activation, negative_slope, store_delta=store,
                                              bias_grad=bias_grad, dtype=x.dtype)
        delta = delta if store else grad_y
    if grad_b_out is not None and grad_b is not None:
        grad_b = grad_b_out.copy_(grad_b)
    if M == 0 or K == 0 or N == 0:
        return grad_w.zero_(), grad_b
    key = backward_weight_key(delta, x, grad_w, split_k, config)
    args = (delta, x, grad_w)
    plan = PLANS.get(key)
    if plan is None:
        plan = BackwardWeightPlan.build(key, args)
    plan.run(*args)
    return grad_w, grad_b


def backward_weight_key(delta, x, grad_w, split_k: int | None = None, config=None) -> GemmKey:
    """The key of the GEMM δᵀ x's plan for operands that passed its checks (δ in x's dtype):
    ``plan.run(delta, x, grad_w)`` runs it."""
    (M, N), K = delta.shape, x.shape[1]
    return _new(GemmKey, ("backward_weight", x.device, x.dtype, delta.dtype, M, N, K, delta.stride(), x.stride(),
                          grad_w.stride(), (split_k,), plans.dot_precision(x.dtype),
                          None if config is None else as_config(config)))


# ------------------------------------------------------------------------------------- DFA

def fa_linear_dfa_delta(
    error: torch.Tensor,
    feedback: torch.Tensor,
    saved: torch.Tensor | None,
    activation: str,
    negative_slope: float = 0.0,
    *,
    out: torch.Tensor | None = None,
    config: LaunchConfig | dict | None = None,
) -> torch.Tensor:
    """Direct feedback alignment's local errors in one GEMM: ``δ = (e B) ⊙ f'(saved)``.

    Args: error e [M, n_out] (the loss's gradient at the network's output), feedback B
    [n_out, N] (every hidden layer's matrix side by side), saved [M, N] (each layer's y, or f'(z)
    for gelu; None for identity); ``out``, an optional [M, N] tensor of B's dtype.
    Returns δ [M, N] in B's dtype.
    """
    _check_activation(activation)
    M, K = error.shape
    N = feedback.shape[1]
    _check_shape(feedback, (K, N), "feedback")
    _check_shape(saved, (M, N), "saved")
    if out is None:
        delta = torch.empty((M, N), device=error.device, dtype=feedback.dtype)
    else:
        check_out(out, (M, N), feedback, "out")
        delta = out
    if M == 0 or N == 0:
        return delta
    if error.dtype != feedback.dtype:
        error = error.to(feedback.dtype)  # one operand dtype: the main loop converts nothing
    saved_arg = saved if saved is not None else delta
    key = _new(GemmKey, ("dfa", error.device, feedback.dtype, saved_arg.dtype, M, N, K, error.stride(),
                         feedback.stride(), (saved_arg.stride(), delta.stride()), (activation,),
                         plans.dot_precision(feedback.dtype), None if config is None else as_config(config)))
    args = (error, feedback, saved_arg, delta, float(negative_slope))
    plan = PLANS.get(key)
    if plan is None:
        plan = DFAPlan.build(key, args)
    plan.run(*args)
    return delta



# ------------------------------------------------------------------------------- fused MLP

def _four(per_layer: list, fill) -> list:
    """A per-layer list padded to the fused kernels' fixed tuning.MLP_MAX_LAYERS slots (the slots
    past LAYERS are compiled out; ``fill`` only gives them a valid argument)."""
    return list(per_layer) + [fill] * (tuning.MLP_MAX_LAYERS - len(per_layer))


def mlp_fusable(x: torch.Tensor, weights: list, biases: list) -> bool:
    """Whether :func:`fa_mlp_forward` takes this chain: 2 to ``tuning.MLP_MAX_LAYERS`` layers,
    every layer at most ``tuning.MLP_MAX_WIDTH`` wide, the widths chaining from x [M, K], and x,
    every weight and bias of one Triton dtype on one device; fp32 only with tf32 dots (PyTorch's
    switch): IEEE fp32 dots are FMA loops whose 128-wide operands spill on sm_90 and sm_80 at
    every row block (the compile guard measured 88 to 9 200 bytes), so those chains run layer by layer."""
    if not 2 <= len(weights) <= tuning.MLP_MAX_LAYERS or x.dim() != 2 or len(biases) != len(weights):
        return False
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or plans.dot_precision(x.dtype) == "ieee":
        return False
    width = x.shape[1]
    for weight, bias in zip(weights, biases):
        if (weight.dim() != 2 or weight.shape[1] != width or weight.shape[0] > tuning.MLP_MAX_WIDTH
                or weight.shape[0] == 0 or weight.dtype != x.dtype or weight.device != x.device):
            return False
        if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype or bias.device != x.device):
            return False
        width = weight.shape[0]
    return True


def fa_mlp_forward(
    x: torch.Tensor,
    weights: list,
    biases: list,
    activations: list,
    negative_slopes: list,
    out: torch.Tensor | None = None,
    *,
    config: LaunchConfig | dict | None = None,
) -> list:
    """The fused narrow MLP's forward (``mlp_kernels.py``): ``y_l = f_l(h_{l-1} W_lᵀ + b_l)``
    for every layer in one launch, h_0 = x.

    Args: x [M, K] (any strides), weights [N_l, N_{l-1}] (any strides), biases [N_l] or None,
    one activation and negative slope per layer; ``out``, an optional [M, N_L] tensor for the
    last y; ``config``: block_rows (rows per program), block_red (the first layer's K step),
    num_warps and num_stages (block_cols is not used). The chain must pass :func:`mlp_fusable`.
    Returns [y_1, …, y_L], each [M, N_l] (contiguous, but ``out``), in x's dtype.
    """
    if not mlp_fusable(x, weights, biases):
        raise ValueError(
            f"fa_mlp_forward takes 2 to {tuning.MLP_MAX_LAYERS} chaining layers at most {tuning.MLP_MAX_WIDTH} wide, "
            f"all of x's dtype and device (fp32 with tf32 dots only); got x {tuple(x.shape)} {x.dtype} and weights "
            f"{[tuple(w.shape) for w in weights]}")
    for activation in activations:
        _check_activation(activation)
    count = len(weights)
    if len(activations) != count or len(negative_slopes) != count:
        raise ValueError(f"one activation and negative slope per layer: {count} layers, got {len(activations)} "
                         f"activations and {len(negative_slopes)} slopes")
    M, K = x.shape
    widths = [w.shape[0] for w in weights]
    outputs = [x.new_empty((M, n)) for n in widths[:-1]]
    if out is None:
        outputs.append(x.new_empty((M, widths[-1])))
    else:
        check_out(out, (M, widths[-1]), x, "out")
        if not out.is_contiguous():
            raise ValueError(f"out must be contiguous, got strides {out.stride()}")
        outputs.append(out)
    if M == 0:
        return outputs
    biases = [b if b is None or b.stride(0) == 1 else b.contiguous() for b in biases]
    cfg = as_config(config) if config is not None else tuning.mlp_config(M, K, max(widths), x.dtype, INTERPRETED)
    ws = _four(weights, weights[0])
    bs = _four([y if b is None else b for b, y in zip(biases, outputs)], outputs[0])
    ys = _four(outputs, outputs[0])
    ns = _four(widths, widths[0])
    flags = {}
    for index in range(tuning.MLP_MAX_LAYERS):
        real = index < count
        flags[f"HAS_BIAS{index + 1}"] = real and biases[index] is not None
        flags[f"ACTIVATION{index + 1}"] = activations[index] if real else "identity"
        flags[f"BLOCK_N{index + 1}"] = tuning.block(ns[index], tuning.MLP_MAX_WIDTH)
    slopes = _four([float(s) for s in negative_slopes], 0.0)
    launch = on_device(x, Launch(mlp.mlp_forward_kernel, (cdiv(M, cfg.block_rows),), dict(
        flags, LAYERS=count, INPUT_PRECISION=plans.dot_precision(x.dtype),
        USE_INT64=plans.needs_int64(x, *outputs, *weights), BLOCK_M=cfg.block_rows, BLOCK_K=cfg.block_red,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)))
    launch(x, ws[0], bs[0], ys[0], ws[1], bs[1], ys[1], ws[2], bs[2], ys[2], ws[3], bs[3], ys[3],
           M, K, *ns, *x.stride(), *(s for w in ws for s in w.stride()), *slopes)
    return outputs


def mlp_backward_fusable(grad_y: torch.Tensor, x: torch.Tensor, outputs: list) -> bool:
    """Whether :func:`fa_mlp_backward` takes this chain, read off the tensors the backward has
    before any B is formed: grad_y [M, N_L], the chain's input x [M, K] and the saved outputs
    y_l [M, N_l] (the top one may be None: the identity), asking what :func:`mlp_fusable` asks
    of the forward (B_l has W_l's shape [N_l, N_{l-1}], dtype and device)."""
    return (_mlp_chain_fits(grad_y, outputs) and x.dim() == 2 and x.shape[0] == grad_y.shape[0]
            and x.dtype == grad_y.dtype and x.device == grad_y.device)


def _mlp_chain_fits(grad_y: torch.Tensor, outputs: list) -> bool:
    count = len(outputs)
    if not 2 <= count <= tuning.MLP_MAX_LAYERS or grad_y.dim() != 2:
        return False
    dtype, M = grad_y.dtype, grad_y.shape[0]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16) or plans.dot_precision(dtype) == "ieee":
        return False
    for index, y in enumerate(outputs):
        width = grad_y.shape[1] if index == count - 1 else (y.shape[1] if y is not None and y.dim() == 2 else -1)
        if not 0 < width <= tuning.MLP_MAX_WIDTH:
            return False
        if y is not None and (y.dtype != dtype or y.device != grad_y.device or y.shape != (M, width)):
            return False
    return True


def fa_mlp_backward(
    grad_y: torch.Tensor,
    outputs: list,
    feedbacks: list,
    activations: list,
    negative_slopes: list,
    need_grad_x: bool,
    bias_grads: list,
    *,
    config: LaunchConfig | dict | None = None,
) -> tuple:
    """The fused narrow MLP's δ chain (``mlp_kernels.mlp_backward_kernel``) in one launch, and
    every grad_b from one in-order sum of its partials.

    Args: grad_y [M, N_L] (any strides), outputs y_l [M, N_l] as the forward stored them (the
    top one None when its activation is the identity), feedbacks B_l [N_l, N_{l-1}] as the
    layers' rules form them (B_1 [N1, K] read only for grad_x; else None), one
    activation and slope per layer, ``need_grad_x``, ``bias_grads`` (per layer: form grad_b).
    Returns ([δ_1 … δ_L] in grad_y's dtype, contiguous; [grad_b_l or None]; grad_x [M, K] or None).
    """
    fits = _mlp_chain_fits(grad_y, outputs) and len(feedbacks) == len(outputs)
    if fits:
        widths = [y.shape[1] for y in outputs[:-1]] + [grad_y.shape[1]]
        K = feedbacks[0].shape[1] if feedbacks[0] is not None else 0
        # B_l [N_l, N_{l-1}] (B_1 [N1, K], present exactly when grad_x is wanted) of grad_y's dtype and device.
        fits = (feedbacks[0] is not None) == need_grad_x and all(
            b is None and i == 0 or b is not None and tuple(b.shape) == (n, K if i == 0 else widths[i - 1])
            and b.dtype == grad_y.dtype and b.device == grad_y.device
            for i, (b, n) in enumerate(zip(feedbacks, widths)))
    if not fits:
        raise ValueError(
            f"fa_mlp_backward takes 2 to {tuning.MLP_MAX_LAYERS} chaining layers at most {tuning.MLP_MAX_WIDTH} wide, "
            f"of grad_y's dtype and device (fp32 with tf32 dots only); got grad_y {tuple(grad_y.shape)} "
            f"{grad_y.dtype}, outputs {[None if y is None else tuple(y.shape) for y in outputs]} and feedbacks "
            f"{[None if b is None else tuple(b.shape) for b in feedbacks]}")
    for activation in activations:
        _check_activation(activation)
    count = len(feedbacks)
    M = grad_y.shape[0]
    deltas = [grad_y.new_empty((M, n)) for n in widths]
    columns, total = [], 0
    for width, wanted in zip(widths, bias_grads):
        columns.append(total)
        total += width if wanted else 0
    grad_x = grad_y.new_empty((M, K)) if need_grad_x else None
    if M == 0:
        grad_bs = [grad_y.new_zeros((n,)) if wanted else None for n, wanted in zip(widths, bias_grads)]
        return deltas, grad_bs, grad_x
    cfg = as_config(config) if config is not None else tuning.mlp_config(M, max(K, 16), max(widths), grad_y.dtype,
                                                                         INTERPRETED)
    programs = cdiv(M, cfg.block_rows)
    partial = grad_y.new_empty((programs, max(total, 1)), dtype=torch.float32)
    outputs = [y if y is None or y.is_contiguous() else y.contiguous() for y in outputs]
    ys = _four([deltas[0] if y is None else y for y in outputs], deltas[0])
    fbs = _four([deltas[0] if b is None else b for b in feedbacks], deltas[0])
    ns = _four(widths, widths[0])
    fb_strides = [s for b in fbs for s in (b.stride() if b.dim() == 2 else (0, 0))]
    flags = {}
    for index in range(tuning.MLP_MAX_LAYERS):
        real = index < count
        flags[f"ACTIVATION{index + 1}"] = activations[index] if real else "identity"
        flags[f"BIAS{index + 1}"] = real and bool(bias_grads[index])
        flags[f"BLOCK_N{index + 1}"] = tuning.block(ns[index], tuning.MLP_MAX_WIDTH)
    slopes = _four([float(s) for s in negative_slopes], 0.0)
    x_strides = grad_x.stride() if grad_x is not None else (0, 0)
    launch = on_device(grad_y, Launch(mlp.mlp_backward_kernel, (programs,), dict(
        flags, LAYERS=count, NEED_GRAD_X=need_grad_x, INPUT_PRECISION=plans.dot_precision(grad_y.dtype),
        USE_INT64=plans.needs_int64(grad_y, grad_x, *deltas, *[t for t in outputs + feedbacks if t is not None]),
        BLOCK_M=cfg.block_rows, BLOCK_K=cfg.block_red, num_warps=cfg.num_warps, num_stages=cfg.num_stages)))
    launch(grad_y, *ys, *fbs, *_four(deltas, deltas[0]), partial, deltas[0] if grad_x is None else grad_x,
           M, K, *ns, partial.shape[1], *_four(columns, 0), *grad_y.stride(), *fb_strides, *x_strides, *slopes)
    grad_bs = [None] * count
    if total:
        summed = grad_y.new_empty((total,))
        split_sum(partial, summed, programs)
        for index, (width, wanted) in enumerate(zip(widths, bias_grads)):
            if wanted:
                grad_bs[index] = summed[columns[index]:columns[index] + width]
    return deltas, grad_bs, grad_x


def fa_mlp_weight_grads(deltas: list, inputs: list, wanted: list, *,
                        config: LaunchConfig | dict | None = None) -> list:
    """Every layer's ``grad_W_l = δ_lᵀ h_{l-1}`` from one grouped launch
    (``mlp_kernels.mlp_weight_grad_kernel``).

    Args: deltas δ_l [M, N_l] (contiguous, as :func:`fa_mlp_backward` gives them), inputs h_{l-1}
    [M, K_l] (any strides; h_0 = x), ``wanted`` per layer; ``config``: block_rows × block_cols
    tiles of grad_W and block_red batch rows per step. Returns [grad_W_l [N_l, K_l] or None].
    """
    count = len(deltas)
    if not 1 <= count <= tuning.MLP_MAX_LAYERS or len(inputs) != count or len(wanted) != count:
        raise ValueError(f"fa_mlp_weight_grads takes 1 to {tuning.MLP_MAX_LAYERS} layers, got {count} deltas, "
                         f"{len(inputs)} inputs and {len(wanted)} flags")
    M = deltas[0].shape[0]
    for delta, h in zip(deltas, inputs):
        if (not delta.is_contiguous() or delta.dim() != 2 or h.dim() != 2 or delta.shape[0] != M or h.shape[0] != M
                or h.dtype != delta.dtype or h.device != delta.device):
            raise ValueError(f"fa_mlp_weight_grads needs contiguous δ [M, N_l] and h [M, K_l] of one dtype and "
                             f"device, got δ {tuple(delta.shape)} {delta.dtype} and h {tuple(h.shape)} {h.dtype}")
    grads = [delta.new_empty((delta.shape[1], h.shape[1])) if want else None
             for delta, h, want in zip(deltas, inputs, wanted)]
    if M == 0:
        return [g if g is None else g.zero_() for g in grads]
    cfg = as_config(config) if config is not None else tuning.mlp_weight_config(deltas[0].dtype, INTERPRETED)
    ends, total = [], 0
    for delta, h, want in zip(deltas, inputs, wanted):
        if want:
            total += cdiv(delta.shape[1], cfg.block_rows) * cdiv(h.shape[1], cfg.block_cols)
        ends.append(total)
    if total == 0:
        return grads
    pad = tuning.MLP_MAX_LAYERS - count
    operands = []
    for delta, h, grad in zip(deltas, inputs, grads):
        operands += [delta, h, delta if grad is None else grad]
    operands += operands[:3] * pad
    sizes = [s for delta, h in zip(deltas, inputs) for s in (delta.shape[1], h.shape[1])] + [1, 1] * pad
    strides = [s for h in inputs for s in h.stride()] + [0, 0] * pad
    launch = on_device(deltas[0], Launch(mlp.mlp_weight_grad_kernel, (total,), dict(
        LAYERS=count, INPUT_PRECISION=plans.dot_precision(deltas[0].dtype),
        USE_INT64=plans.needs_int64(*deltas, *inputs, *[g for g in grads if g is not None]),
        BLOCK_N=cfg.block_rows, BLOCK_K=cfg.block_cols, BLOCK_M=cfg.block_red, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)))
    launch(*operands, M, *sizes, *(ends + [total] * pad)[:3], *strides)
    return grads


# ------------------------------------------------------------------------------------ stacked
#
# E models' same layer (E seeds of one network, torch.func.vmap over stacked parameters) in one
# launch per job: the single-model pointer kernels with the model as the grid's third axis
# (jit_helpers.model_offset). The config is the heuristic's for one model's problem on an E-th
# of the SMs (the models share the GPU), without split reduction or tensor descriptors, or the
# one given; each model's result is then bitwise what its own launch with that config gives.

def _stacked_config(job: str, rows: int, cols: int, red: int, dtype: torch.dtype, models: int,
                    device: torch.device, config) -> LaunchConfig:
    if config is not None:
        cfg = as_config(config)
        if cfg.tma or cfg.split > 1:
            raise ValueError(f"a stacked launch takes neither tensor descriptors nor split reductions, got {cfg}")
        return cfg
    sms = max(1, tuning.sm_count(device) // models)
    return tuning.heuristic_config(job, rows, cols, red, dtype, sms, INTERPRETED).replace(split=1)


# The models are the grid's third axis, which CUDA caps at 65535 programs.
MAX_STACKED_MODELS = 65535


def _check_stacked(t: torch.Tensor | None, dims: int, name: str) -> None:
    if t is not None and t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions (the models first), got shape {tuple(t.shape)}")
    if t is not None and t.shape[0] > MAX_STACKED_MODELS:
        raise ValueError(f"a stacked launch takes at most {MAX_STACKED_MODELS} models (the grid's third axis), "
                         f"got {name} of shape {tuple(t.shape)}")


def fa_stacked_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    negative_slope: float = 0.0,
    store_extra: bool = False,
    *,
    config: LaunchConfig | dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`fa_linear_forward` of E models in one launch: x [E, M, K], weight [E, N, K], bias
    [E, N] or None (any strides, 0 between models included) -> y [E, M, N] and, when
    ``store_extra``, the extra tensor [E, M, N] (else None), contiguous."""
    _check_activation(activation)
    _check_stacked(x, 3, "x")
    E, M, K = x.shape
    N = weight.shape[1] if weight.dim() == 3 else -1
    _check_shape(weight, (E, N, K), "weight")
    _check_shape(bias, (E, N), "bias")
    y = x.new_empty((E, M, N))
    extra = x.new_empty((E, M, N)) if store_extra else None
    if E == 0 or M == 0 or N == 0:
        return y, extra
    if bias is not None and bias.stride(1) != 1 and N > 1:
        bias = bias.contiguous()  # the kernel reads bias with a unit stride
    cfg = _stacked_config("forward", M, N, K, x.dtype, E, x.device, config)
    launch = Launch(gemm.forward_kernel, (cdiv(M, cfg.block_rows) * cdiv(N, cfg.block_cols), 1, E), dict(
        HAS_BIAS=bias is not None, STORE_EXTRA=store_extra, ACTIVATION=activation,
        USE_INT64=plans.needs_int64(x, weight, y), STACKED=True, SPLIT=False,
        EPILOGUE_HALVES=plans.epilogue_halves(activation, store_extra, cfg),
        **plans.gemm_meta(cfg, plans.dot_precision(x.dtype), "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")))
    on_device(x, launch)(x, weight, y if bias is None else bias, y, y if extra is None else extra, y, M, N, K, K,
                         *x.stride(), *weight.stride(), 0 if bias is None else bias.stride(0), *y.stride(),
                         float(negative_slope))
    return y, extra


def fa_stacked_local_error(
    grad_y: torch.Tensor,
    saved: torch.Tensor | None,
    activation: str,
    negative_slope: float = 0.0,
    *,
    store_delta: bool = True,
    bias_grad: bool = True,
    dtype: torch.dtype | None = None,
    config: LaunchConfig | dict | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """:func:`fa_linear_local_error` of E models in one launch: grad_y, saved [E, M, N] (saved
    None for the identity) -> (δ [E, M, N] or None, grad_b [E, N] or None), in ``dtype``
    (default grad_y's); grad_b summed in fp32 from δ before its rounding, in a fixed order;
    ``config``: block_rows × block_cols and num_warps of the pass (default: the tuned one's for
    an E-th of the SMs)."""
    _check_activation(activation)
    _check_stacked(grad_y, 3, "grad_y")
    E, M, N = grad_y.shape
    _check_shape(saved, (E, M, N), "saved")
    dtype = grad_y.dtype if dtype is None else dtype
    delta = grad_y.new_empty((E, M, N), dtype=dtype) if store_delta else None
    grad_b = grad_y.new_empty((E, N), dtype=dtype) if bias_grad else None
    if E == 0 or N == 0 or not (store_delta or bias_grad):
        return delta, grad_b
    if M == 0:
        return delta, None if grad_b is None else grad_b.zero_()
    if config is not None:
        cfg = as_config(config)
        if cfg.split > 1:
            raise ValueError(f"a stacked launch takes no split reduction, got {cfg}")
    else:
        cfg = tuning.pass_config(M, N, max(1, tuning.sm_count(grad_y.device) // E), INTERPRETED)
    saved_arg = grad_y if saved is None else saved
    delta_arg = grad_y if delta is None else delta
    launch = Launch(passes.local_error_kernel, (cdiv(N, cfg.block_cols), 1, E), dict(
        ACTIVATION=activation, STORE_DELTA=store_delta, BIAS_GRAD=bias_grad,
        USE_INT64=plans.needs_int64(grad_y, saved, delta), STACKED=True, BLOCK_M=cfg.block_rows,
        BLOCK_N=cfg.block_cols, num_warps=cfg.num_warps))
    on_device(grad_y, launch)(grad_y, saved_arg, delta_arg, grad_y if grad_b is None else grad_b, M, N, M,
                              *grad_y.stride(), *saved_arg.stride(), *delta_arg.stride(),
                              0 if grad_b is None else grad_b.stride(0), float(negative_slope))
    return delta, grad_b


def fa_stacked_feedback(
    weight: torch.Tensor,
    feedback: torch.Tensor | None,
    method: str,
    *,
    feedback_scale: float = 1.0,
    seed: int = 0,
    counter: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`fa_linear_feedback` of E models in one launch: weight [E, N, K] (and feedback R
    [E, N, K] for frsf) -> B [E, N, K] (contiguous, W's dtype). brsf: one seed and draw for all,
    so every model draws the R its own launch would."""
    _check_stacked(weight, 3, "weight")
    E, N, K = weight.shape
    if method not in SIGN_METHODS:
        raise ValueError(f"method must be one of {SIGN_METHODS} to form B from W's sign, got {method!r}")
    if method == "frsf" and feedback is None:
        raise ValueError("method='frsf' needs feedback (the magnitudes R)")
    if method == "brsf" and (counter is None or counter.numel() != 1 or counter.dtype != torch.int64):
        raise ValueError("method='brsf' needs counter, an int64 tensor of one element")
    if method == "frsf":
        _check_shape(feedback, (E, N, K), "feedback")
    out = weight.new_empty((E, N, K))
    if out.numel() == 0:
        return out
    feedback_arg = weight if feedback is None else feedback
    block_n, block_k = (64, 64) if INTERPRETED else (32, 128)
    launch = Launch(passes.feedback_kernel, (cdiv(N, block_n), cdiv(K, block_k), E), dict(
        METHOD=method, USE_INT64=plans.needs_int64(weight, feedback, out), STACKED=True, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=4))
    on_device(weight, launch)(weight, feedback_arg, out if counter is None else counter, out, N, K, *weight.stride(),
                              *feedback_arg.stride(), N * K, float(feedback_scale), seed)
    return out


def _stacked_gemm_sizes(delta: torch.Tensor, other: torch.Tensor, name: str) -> tuple[int, int, int, int]:
    """(E, M, N, K) of a stacked backward GEMM: δ [E, M, N] with B [E, N, K] (``name``
    "feedback") or x [E, M, K] (``name`` "x"), checked, in one dtype."""
    _check_stacked(delta, 3, "delta")
    E, M, N = delta.shape
    K = other.shape[2] if other.dim() == 3 else -1
    _check_shape(other, (E, N if name == "feedback" else M, K), name)
    if delta.dtype != other.dtype:
        raise TypeError(f"delta and {name} must have one dtype, got {delta.dtype} and {other.dtype}")
    return E, M, N, K


def _finished(out: torch.Tensor, reduction: int) -> bool:
    """Whether ``out`` needs no launch: it is empty, or its sum runs over nothing (then zeroed)."""
    if out.numel() and not reduction:
        out.zero_()
    return not out.numel() or not reduction


def fa_stacked_backward_input(
    delta: torch.Tensor,
    feedback: torch.Tensor,
    *,
    config: LaunchConfig | dict | None = None,
) -> torch.Tensor:
    """grad_x = δ B of E models in one launch: δ [E, M, N], B [E, N, K] (any strides) -> grad_x
    [E, M, K] (contiguous, B's dtype; δ must have it too)."""
    E, M, N, K = _stacked_gemm_sizes(delta, feedback, "feedback")
    grad_x = feedback.new_empty((E, M, K))
    if _finished(grad_x, N):
        return grad_x
    cfg = _stacked_config("backward_input", M, K, N, feedback.dtype, E, delta.device, config)
    launch = Launch(gemm.backward_input_kernel, (cdiv(M, cfg.block_rows) * cdiv(K, cfg.block_cols), 1, E), dict(
        USE_INT64=plans.needs_int64(delta, feedback, grad_x), STACKED=True,
        **plans.gemm_meta(cfg, plans.dot_precision(feedback.dtype), "BLOCK_M", "BLOCK_K", "BLOCK_N", "GROUP_M")))
    on_device(grad_x, launch)(delta, feedback, grad_x, M, N, K, *delta.stride(), *feedback.stride(), *grad_x.stride())
    return grad_x


def fa_stacked_backward_weight(
    delta: torch.Tensor,
    x: torch.Tensor,
    *,
    config: LaunchConfig | dict | None = None,
) -> torch.Tensor:
    """grad_W = δᵀ x of E models in one launch: δ [E, M, N], x [E, M, K] (any strides, one dtype)
    -> grad_W [E, N, K] (contiguous, x's dtype)."""
    E, M, N, K = _stacked_gemm_sizes(delta, x, "x")
    grad_w = x.new_empty((E, N, K))
    if _finished(grad_w, M):
        return grad_w
    cfg = _stacked_config("backward_weight", N, K, M, x.dtype, E, x.device, config)
    launch = Launch(gemm.backward_weight_kernel, (cdiv(N, cfg.block_rows) * cdiv(K, cfg.block_cols), 1, E), dict(
        USE_INT64=plans.needs_int64(delta, x, grad_w), STACKED=True,
        **plans.gemm_meta(cfg, plans.dot_precision(x.dtype), "BLOCK_N", "BLOCK_K", "BLOCK_M", "GROUP_N")))
    on_device(x, launch)(delta, x, grad_w, M, N, K, M, *delta.stride(), *x.stride(), grad_w.stride(0), 0, K, 1)
    return grad_w
