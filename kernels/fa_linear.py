"""Triton kernels of the feedback-alignment linear layer, and their launchers.

Shapes (nn.Linear's layout; M rows of the flattened batch, K = in_features, N = out_features)::

    x: [M, K]   weight W: [N, K]   feedback B: [N, K]   bias b: [N]
    forward:          z = x Wᵀ + b,  y = f(z)                       -> y [M, N]
    backward input:   grad_x = (g ⊙ f'(z)) B                        -> [M, K]
    backward weight:  grad_W = (g ⊙ f'(z))ᵀ x,  grad_b = Σ_rows δ   -> [N, K], [N]

Every kernel accumulates in fp32 and recomputes δ = g ⊙ f'(z) from g and the saved
activation as it loads them, so δ is never written to memory. Wᵀ is read through
strides; nothing is transposed or copied. Reductions are done inside one program in a
fixed order (no atomics), so identical inputs give bitwise identical results.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRETED",
    "fa_linear_forward",
    "fa_linear_backward_input",
    "fa_linear_backward_weight",
]

_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_INT32_MAX = 2**31 - 1


@triton.jit
def _apply_activation(z, ACTIVATION: tl.constexpr, negative_slope):
    # `where(z < 0, ...)` rather than maximum: NaN must propagate as in torch.relu.
    if ACTIVATION == "relu":
        y = tl.where(z < 0, 0.0, z)
    elif ACTIVATION == "leaky_relu":
        y = tl.where(z < 0, z * negative_slope, z)
    elif ACTIVATION == "tanh":
        y = 2.0 * tl.sigmoid(2.0 * z) - 1.0
    elif ACTIVATION == "sigmoid":
        y = tl.sigmoid(z)
    elif ACTIVATION == "gelu":
        y = 0.5 * z * (1.0 + tl.math.erf(z * _INV_SQRT2))
    else:
        y = z
    return y


@triton.jit
def _activation_backward(grad_y, saved, ACTIVATION: tl.constexpr, negative_slope):
    # δ = g ⊙ f'(z); `saved` is y, or z where f' cannot be read off y (gelu, leaky
    # slope < 0), as chosen by fa_triton.activations.saves_preactivation.
    if ACTIVATION == "relu":
        delta = tl.where(saved > 0, grad_y, 0.0)
    elif ACTIVATION == "leaky_relu":
        delta = tl.where(saved > 0, grad_y, grad_y * negative_slope)
    elif ACTIVATION == "tanh":
        delta = grad_y * (1.0 - saved * saved)
    elif ACTIVATION == "sigmoid":
        delta = grad_y * saved * (1.0 - saved)
    elif ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(saved * _INV_SQRT2))
        pdf = tl.exp(-0.5 * saved * saved) * _INV_SQRT_2PI
        delta = grad_y * (cdf + saved * pdf)
    else:
        delta = grad_y
    return delta


@triton.jit
def _grouped_tile(pid, num_rows, num_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                  GROUP_ROWS: tl.constexpr):
    # Grouped ordering (Triton tutorial 03): neighbouring programs share row tiles,
    # so operand tiles are reused from L2.
    num_pid_rows = tl.cdiv(num_rows, BLOCK_ROWS)
    num_pid_cols = tl.cdiv(num_cols, BLOCK_COLS)
    num_pid_in_group = GROUP_ROWS * num_pid_cols
    group_id = pid // num_pid_in_group
    first_pid_row = group_id * GROUP_ROWS
    group_size = min(num_pid_rows - first_pid_row, GROUP_ROWS)
    pid_row = first_pid_row + ((pid % num_pid_in_group) % group_size)
    pid_col = (pid % num_pid_in_group) // group_size
    return pid_row, pid_col


@triton.jit
def _fa_linear_forward_kernel(
    # pointers
    x_ptr, weight_ptr, bias_ptr, y_ptr, preact_ptr,
    # sizes
    M, N, K,
    # strides
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ym, stride_yn,
    # scalars
    negative_slope,
    # flags
    HAS_BIAS: tl.constexpr, STORE_PREACT: tl.constexpr, ACTIVATION: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, USE_INT64: tl.constexpr,
    # block sizes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[M, N] = f(x[M, K] @ W[N, K]ᵀ + b[N]); z is stored too when STORE_PREACT (same strides as y)."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if USE_INT64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    wt_cols = weight_ptr + offs_n[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if USE_INT64:
            offs_k = offs_k.to(tl.int64)
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # Wᵀ tile [BLOCK_K, BLOCK_N] read straight from W's [N, K] layout.
        wt = tl.load(wt_cols + offs_k[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x, wt, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    out_offs = offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    out_mask = mask_m[:, None] & mask_n[None, :]
    if STORE_PREACT:
        tl.store(preact_ptr + out_offs, acc.to(preact_ptr.dtype.element_ty), mask=out_mask)
    y = _apply_activation(acc, ACTIVATION, negative_slope)
    tl.store(y_ptr + out_offs, y.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _fa_linear_backward_input_kernel(
    # pointers
    grad_y_ptr, saved_ptr, feedback_ptr, grad_x_ptr,
    # sizes
    M, N, K,
    # strides
    stride_gm, stride_gn,
    stride_sm, stride_sn,
    stride_bn, stride_bk,
    stride_gxm, stride_gxk,
    # scalars
    negative_slope,
    # flags
    ACTIVATION: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_INT64: tl.constexpr,
    # block sizes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """grad_x[M, K] = (g[M, N] ⊙ f'(saved[M, N])) @ B[N, K]: tiles over (M, K), reduces over N."""
    pid_m, pid_k = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    if USE_INT64:
        offs_m = offs_m.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    mask_m = offs_m < M
    mask_k = offs_k < K
    g_rows = grad_y_ptr + offs_m[:, None] * stride_gm
    s_rows = saved_ptr + offs_m[:, None] * stride_sm
    b_cols = feedback_ptr + offs_k[None, :] * stride_bk

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        if USE_INT64:
            offs_n = offs_n.to(tl.int64)
        tile_mask = mask_m[:, None] & mask_n[None, :]
        g = tl.load(g_rows + offs_n[None, :] * stride_gn, mask=tile_mask, other=0.0).to(tl.float32)
        if ACTIVATION != "identity":
            s = tl.load(s_rows + offs_n[None, :] * stride_sn, mask=tile_mask, other=0.0).to(tl.float32)
            g = _activation_backward(g, s, ACTIVATION, negative_slope)
        feedback = tl.load(b_cols + offs_n[:, None] * stride_bn, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        # δ is rounded to the operand dtype, as PyTorch's own δ would be.
        acc = tl.dot(g.to(feedback.dtype), feedback, acc, input_precision=INPUT_PRECISION)

    out = grad_x_ptr + offs_m[:, None] * stride_gxm + offs_k[None, :] * stride_gxk
    tl.store(out, acc.to(grad_x_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _fa_linear_backward_weight_kernel(
    # pointers
    grad_y_ptr, saved_ptr, x_ptr, grad_w_ptr, grad_b_ptr,
    # sizes
    M, N, K,
    # strides
    stride_gm, stride_gn,
    stride_sm, stride_sn,
    stride_xm, stride_xk,
    stride_gwn, stride_gwk,
    # scalars
    negative_slope,
    # flags
    HAS_BIAS_GRAD: tl.constexpr, ACTIVATION: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    USE_INT64: tl.constexpr,
    # block sizes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    """grad_W[N, K] = δᵀ @ x and grad_b[N] = Σ_m δ, δ = g ⊙ f'(saved): tiles over (N, K), reduces over M.

    The programs of the first K-tile column also own grad_b: they sum the same δ tiles
    they already hold, so grad_b costs no extra pass over g.
    """
    pid_n, pid_k = _grouped_tile(tl.program_id(0), N, K, BLOCK_N, BLOCK_K, GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    if USE_INT64:
        offs_n = offs_n.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    mask_n = offs_n < N
    mask_k = offs_k < K
    g_cols = grad_y_ptr + offs_n[None, :] * stride_gn
    s_cols = saved_ptr + offs_n[None, :] * stride_sn
    x_cols = x_ptr + offs_k[None, :] * stride_xk

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        if USE_INT64:
            offs_m = offs_m.to(tl.int64)
        tile_mask = mask_m[:, None] & mask_n[None, :]
        delta = tl.load(g_cols + offs_m[:, None] * stride_gm, mask=tile_mask, other=0.0).to(tl.float32)
        if ACTIVATION != "identity":
            s = tl.load(s_cols + offs_m[:, None] * stride_sm, mask=tile_mask, other=0.0).to(tl.float32)
            delta = _activation_backward(delta, s, ACTIVATION, negative_slope)
        if HAS_BIAS_GRAD:
            bias_acc += tl.sum(delta, axis=0)
        x = tl.load(x_cols + offs_m[:, None] * stride_xm, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(tl.trans(delta.to(x.dtype)), x, acc, input_precision=INPUT_PRECISION)

    out = grad_w_ptr + offs_n[:, None] * stride_gwn + offs_k[None, :] * stride_gwk
    tl.store(out, acc.to(grad_w_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])
    if HAS_BIAS_GRAD:
        tl.store(grad_b_ptr + offs_n, bias_acc.to(grad_b_ptr.dtype.element_ty), mask=mask_n & (pid_k == 0))


# --------------------------------------------------------------------------- launchers

def _is_interpreted() -> bool:
    # @triton.jit picks the interpreter when the module is imported with TRITON_INTERPRET=1.
    return type(_fa_linear_forward_kernel).__name__ == "InterpretedFunction"


INTERPRETED = _is_interpreted()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 dots follow PyTorch's own switch (ieee unless the user allowed tf32); for
    # half types the setting has no effect and "tf32" is Triton's default.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether some element offset (Σ (size-1)·stride) of these tensors exceeds int32."""
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        if sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) > _INT32_MAX:
            return True
    return False


def _block(size: int, cap: int) -> int:
    # tl.dot needs every block dimension >= 16.
    return max(16, min(cap, triton.next_power_of_2(size)))


def _config(rows: int, cols: int, reduction: int, dtype: torch.dtype) -> dict:
    """Block sizes for a [rows, cols] output tile grid reducing over `reduction`."""
    if INTERPRETED:
        # Fewer, larger programs: the interpreter's cost is per program and per loop step.
        return dict(BLOCK_ROWS=_block(rows, 64), BLOCK_COLS=_block(cols, 64), BLOCK_RED=_block(reduction, 64),
                    GROUP=8, num_warps=4, num_stages=1)
    block_red = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_ROWS=_block(rows, 128), BLOCK_COLS=_block(cols, 128), BLOCK_RED=_block(reduction, block_red),
                GROUP=8, num_warps=8 if rows >= 128 and cols >= 128 else 4, num_stages=3)


def fa_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    negative_slope: float = 0.0,
    store_preact: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused ``y = f(x Wᵀ + b)``.

    Args: x [M, K] (any strides), weight [N, K], bias [N] or None; ``out``, an optional
    [M, N] tensor of x's dtype to write y into.
    Returns: y [M, N], and z [M, N] when ``store_preact`` (else None).
    """
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype) if out is None else out
    # z shares y's strides: the kernel addresses both with one set of offsets.
    preact = torch.empty_strided(y.shape, y.stride(), device=x.device, dtype=x.dtype) if store_preact else None
    if M == 0:
        return y, preact
    cfg = _config(M, N, K, x.dtype)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
    _fa_linear_forward_kernel[grid](
        x, weight, bias if bias is not None else y, y, preact if preact is not None else y,
        M, N, K,
        x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1),
        y.stride(0), y.stride(1),
        float(negative_slope),
        HAS_BIAS=bias is not None, STORE_PREACT=store_preact, ACTIVATION=activation,
        INPUT_PRECISION=_dot_precision(x.dtype), USE_INT64=_needs_int64(x, weight, y),
        BLOCK_M=cfg["BLOCK_ROWS"], BLOCK_N=cfg["BLOCK_COLS"], BLOCK_K=cfg["BLOCK_RED"], GROUP_M=cfg["GROUP"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y, preact


def fa_linear_backward_input(
    grad_y: torch.Tensor,
    saved: torch.Tensor | None,
    feedback: torch.Tensor,
    activation: str,
    negative_slope: float = 0.0,
) -> torch.Tensor:
    """``grad_x = (g ⊙ f'(z)) B``.

    Args: grad_y [M, N], saved [M, N] (y or z, see ``saves_preactivation``; None for
    identity), feedback [N, K]. Returns grad_x [M, K] contiguous, in feedback's dtype.
    """
    M, N = grad_y.shape
    K = feedback.shape[1]
    grad_x = torch.empty((M, K), device=grad_y.device, dtype=feedback.dtype)
    if M == 0:
        return grad_x
    saved_arg = saved if saved is not None else grad_y
    cfg = _config(M, K, N, feedback.dtype)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(K, META["BLOCK_K"]),)  # noqa: E731
    _fa_linear_backward_input_kernel[grid](
        grad_y, saved_arg, feedback, grad_x,
        M, N, K,
        grad_y.stride(0), grad_y.stride(1),
        saved_arg.stride(0), saved_arg.stride(1),
        feedback.stride(0), feedback.stride(1),
        grad_x.stride(0), grad_x.stride(1),
        float(negative_slope),
        ACTIVATION=activation, INPUT_PRECISION=_dot_precision(feedback.dtype),
        USE_INT64=_needs_int64(grad_y, saved_arg, feedback, grad_x),
        BLOCK_M=cfg["BLOCK_ROWS"], BLOCK_K=cfg["BLOCK_COLS"], BLOCK_N=cfg["BLOCK_RED"], GROUP_M=cfg["GROUP"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return grad_x


def fa_linear_backward_weight(
    grad_y: torch.Tensor,
    saved: torch.Tensor | None,
    x: torch.Tensor,
    activation: str,
    negative_slope: float = 0.0,
    bias_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``grad_W = δᵀ x`` and ``grad_b = Σ_rows δ`` with ``δ = g ⊙ f'(z)``.

    Args: grad_y [M, N], saved [M, N] or None (identity), x [M, K].
    Returns: grad_W [N, K] and grad_b [N] (None unless ``bias_grad``), in x's dtype.
    """
    M, N = grad_y.shape
    K = x.shape[1]
    grad_w = torch.empty((N, K), device=x.device, dtype=x.dtype)
    grad_b = torch.empty((N,), device=x.device, dtype=x.dtype) if bias_grad else None
    if M == 0:
        grad_w.zero_()
        if grad_b is not None:
            grad_b.zero_()
        return grad_w, grad_b
    saved_arg = saved if saved is not None else grad_y
    cfg = _config(N, K, M, x.dtype)
    grid = lambda META: (triton.cdiv(N, META["BLOCK_N"]) * triton.cdiv(K, META["BLOCK_K"]),)  # noqa: E731
    _fa_linear_backward_weight_kernel[grid](
        grad_y, saved_arg, x, grad_w, grad_b if grad_b is not None else grad_w,
        M, N, K,
        grad_y.stride(0), grad_y.stride(1),
        saved_arg.stride(0), saved_arg.stride(1),
        x.stride(0), x.stride(1),
        grad_w.stride(0), grad_w.stride(1),
        float(negative_slope),
        HAS_BIAS_GRAD=bias_grad, ACTIVATION=activation, INPUT_PRECISION=_dot_precision(x.dtype),
        USE_INT64=_needs_int64(grad_y, saved_arg, x, grad_w),
        BLOCK_N=cfg["BLOCK_ROWS"], BLOCK_K=cfg["BLOCK_COLS"], BLOCK_M=cfg["BLOCK_RED"], GROUP_N=cfg["GROUP"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return grad_w, grad_b
