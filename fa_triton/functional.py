"""The functional form of the FA layer and the autograd Function over the Triton kernels."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .activations import save_for_fa_backward, saves_extra
from .ops import fa_backward, fa_linear_op, launch_backward_input
from .torch_reference import ReferenceFALinearFunction
from .validation import check_backend, check_inputs

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels():
    # Imported on first use, not with the package: triton may be missing (CPU-only
    # installs), and TRITON_INTERPRET=1 only takes effect if set before this import.
    try:
        from . import kernels
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise RuntimeError(f"backend='triton' needs the triton package, which failed to import: {err}") from err
    return kernels


class FALinearFunction(torch.autograd.Function):
    """Feedback-alignment linear layer on the fused Triton kernels.

    Inputs: x [..., K], weight [N, K], bias [N] or None, feedback [N, K] -> y [..., N].
    Backward: grad_x = δ B, grad_W = δᵀ x, grad_b = Σ_rows δ with δ = g ⊙ f'(z); feedback gets none.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, feedback, activation, negative_slope):
        kernels = _kernels()
        in_features = x.shape[-1]
        # reshape is a view whenever the strides allow it (transposed 2-D inputs included);
        # the kernels take any strides, so only un-viewable layouts are copied.
        x2d = x.reshape(-1, in_features)
        store_extra = saves_extra(activation, negative_slope)
        # y is allocated in its final shape so that the returned tensor is not a view
        # (views made inside a Function cannot be modified in place).
        y = torch.empty((*x.shape[:-1], weight.shape[0]), device=x.device, dtype=x.dtype)
        _, extra = kernels.fa_linear_forward(
            x2d, weight, bias, activation, negative_slope, store_extra, out=y.view(-1, weight.shape[0])
        )

        save_for_fa_backward(ctx, x2d, feedback, y, extra, activation, negative_slope)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        kernels = _kernels()
        x2d, feedback, saved = ctx.saved_tensors
        if saved is not None:
            saved = saved.reshape(-1, saved.shape[-1])
        grad_x, grad_w, grad_b = fa_backward(
            ctx, grad_y.reshape(-1, grad_y.shape[-1]), x2d, feedback, saved,
            launch_backward_input, kernels.fa_linear_backward_weight,
            stores_delta=kernels.tuning.STORE_DELTA, bias_grad_in_fp32=True,
        )
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, grad_w, grad_b, None, None, None


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


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The backend that runs for ``x``: "triton" or "torch" (see :func:`fa_linear`)."""
    check_backend(backend)
    if backend == "auto":
        return "triton" if x.is_cuda and x.dtype in TRITON_DTYPES else "torch"
    if backend == "triton":
        if x.dtype not in TRITON_DTYPES:
            raise TypeError(
                f"backend='triton' supports dtypes {TRITON_DTYPES}, got x of dtype {x.dtype}; use backend='torch'"
            )
        if x.device.type == "cpu":
            if not _kernels().INTERPRETED:
                raise RuntimeError(
                    "backend='triton' got CPU tensors, which need Triton's interpreter: set the environment "
                    "variable TRITON_INTERPRET=1 before fa_triton's kernels are first used, move the tensors "
                    "to CUDA, or use backend='torch'"
                )
            if x.dtype == torch.bfloat16:
                # The interpreter loads bf16 as garbage rather than failing: refuse instead.
                raise TypeError(
                    "backend='triton' on CPU tensors runs Triton's interpreter, which has no bfloat16 arithmetic; "
                    "got x of dtype torch.bfloat16 (under torch.autocast('cpu') too): use backend='torch' or 'auto'"
                )
        elif not x.is_cuda:
            raise ValueError(f"backend='triton' runs on CUDA tensors (or CPU with TRITON_INTERPRET=1), got {x.device}")
    return backend


def fa_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    feedback: torch.Tensor,
    activation: str = "relu",
    *,
    negative_slope: float = 0.01,
    backend: str = "auto",
) -> torch.Tensor:
    """Feedback-alignment linear layer: ``y = f(x Wᵀ + b)``, gradients sent back through ``feedback``.

    Args:
        x: input [..., in_features].
        weight: W [out_features, in_features] (nn.Linear's layout).
        bias: b [out_features] or None.
        feedback: fixed random B [out_features, in_features]; receives no gradient.
        activation: one of ``fa_triton.ACTIVATIONS``.
        negative_slope: slope of ``"leaky_relu"`` for z < 0.
        backend: ``"triton"`` (fused kernels), ``"torch"`` (reference) or ``"auto"`` (Triton on CUDA).
    Returns:
        y [..., out_features]; under ``torch.autocast`` in the autocast dtype, as ``nn.Linear``.
    """
    x, weight, bias, feedback = autocast_inputs(x, weight, bias, feedback)
    check_inputs(x, weight, bias, feedback, activation, negative_slope)
    resolved = resolve_backend(backend, x)
    if torch.compiler.is_compiling():
        # torch.compile / torch.export trace the torch.library ops (one graph node each, no
        # graph break). Eager mode keeps the autograd Functions: they cost less per call.
        return fa_linear_op(x, weight, bias, feedback, activation, float(negative_slope), resolved)
    function = FALinearFunction if resolved == "triton" else ReferenceFALinearFunction
    return function.apply(x, weight, bias, feedback, activation, float(negative_slope))
