"""Triton kernels of the feedback-alignment linear layer, and their launchers.

Shapes (nn.Linear's layout; M rows of the flattened batch, K = in_features, N = out_features)::

    x: [M, K]   weight W: [N, K]   feedback B: [N, K]   bias b: [N]
    forward:          z = x Wᵀ + b,  y = f(z)                       -> y [M, N]
    backward input:   grad_x = (g ⊙ f'(z)) B                        -> [M, K]
    backward weight:  grad_W = (g ⊙ f'(z))ᵀ x,  grad_b = Σ_rows δ   -> [N, K], [N]

Every kernel accumulates in fp32 and recomputes δ = g ⊙ f'(z) from g and the saved
activation as it loads them, so δ is never written to memory. Wᵀ is read through
strides; nothing is transposed or copied. Reductions run in a fixed order with no
atomics: inside one program, or, for grad_W over a long batch, as split-K — each batch
slice into its own fp32 partial, then one kernel adds the partials in slice order. So
identical inputs under the same launch config give bitwise identical results.

Launch configs: on a GPU each launcher tunes its block sizes (and grad_W's split count) once
per (device, dtype, layer shape, power-of-two batch bucket), timing a short candidate list
with ``triton.testing.do_bench``; ``FA_TRITON_AUTOTUNE=0`` uses the heuristic config
instead. Under the interpreter, and for launch-bound sizes, the heuristic config is used.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRETED",
    "fa_linear_forward",
    "fa_linear_backward_input",
    "fa_linear_backward_weight",
]

# constexpr: @triton.jit code may read only constexpr globals (the interpreter is laxer).
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
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
        # `saved <= 0`, not `saved > 0`: a NaN output passes g through, as in torch.relu's backward.
        delta = tl.where(saved <= 0, 0.0, grad_y)
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
    M, N, K, rows_per_split,
    # strides
    stride_gm, stride_gn,
    stride_sm, stride_sn,
    stride_xm, stride_xk,
    stride_gws, stride_gwn, stride_gwk,
    stride_gbs,
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

    Split-K over the batch: program (tile, s) with s = program_id(1) reduces only rows
    [s·rows_per_split, (s+1)·rows_per_split) and writes its sums to slice s of grad_w/grad_b
    (stride_gws/stride_gbs apart, fp32 partials); _split_sum_kernel then adds the slices in a
    fixed order. With one split, rows_per_split = M and the split strides are unused.
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

    pid_s = tl.program_id(1)
    m_begin = pid_s * rows_per_split
    m_end = tl.minimum(M, m_begin + rows_per_split)
    grad_w_ptr += pid_s * stride_gws
    grad_b_ptr += pid_s * stride_gbs

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
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


@triton.jit
def _split_sum_kernel(
    # pointers
    partial_ptr, grad_w_ptr, grad_b_ptr,
    # sizes
    numel_w, numel, splits,
    # strides
    stride_split,
    # block sizes
    BLOCK: tl.constexpr,
):
    """out[i] = Σ_s partial[s, i] for i < numel, s = 0, 1, … in order (deterministic, fp32).

    partial [splits, numel] holds grad_W's partials (flat, first numel_w) then grad_b's;
    element i goes to grad_w (contiguous) when i < numel_w, else to grad_b[i - numel_w].
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(partial_ptr + s * stride_split + offs, mask=mask, other=0.0)
    is_weight = offs < numel_w
    tl.store(grad_w_ptr + offs, acc.to(grad_w_ptr.dtype.element_ty), mask=mask & is_weight)
    tl.store(grad_b_ptr + (offs - numel_w), acc.to(grad_b_ptr.dtype.element_ty), mask=mask & (offs >= numel_w))


# --------------------------------------------------------------------------- launch helpers

def _is_interpreted() -> bool:
    # @triton.jit picks the interpreter when the module is imported with TRITON_INTERPRET=1.
    return type(_fa_linear_forward_kernel).__name__ == "InterpretedFunction"


INTERPRETED = _is_interpreted()


def fp32_matmul_allows_tf32() -> bool:
    """Whether PyTorch lets fp32 CUDA matmuls use tf32.

    Since torch 2.9 reading ``allow_tf32`` raises once the newer ``fp32_precision`` switch
    has been set, so that switch is read where it exists (setting ``allow_tf32`` updates it).
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 dots follow PyTorch's own switch (ieee unless the user allowed tf32); for
    # half types the setting has no effect and "tf32" is Triton's default.
    if dtype == torch.float32 and not fp32_matmul_allows_tf32():
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


# --------------------------------------------------------------------------- launch configurations
#
# A config is a dict: BLOCK_ROWS x BLOCK_COLS output tile, BLOCK_RED reduction step, GROUP
# (tile ordering), num_warps, num_stages, and SPLIT (backward weight only: how many slices
# of the batch are reduced by separate programs). The three kernels map onto it as
#   forward:          rows M, cols N, reduction K
#   backward_input:   rows M, cols K, reduction N
#   backward_weight:  rows N, cols K, reduction M (the batch: split-K applies here)

def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


# FA_TRITON_AUTOTUNE=0 keeps the heuristic configs (no tuning runs, same choice in every process).
_AUTOTUNE = _env_flag("FA_TRITON_AUTOTUNE", True)
# Below this many multiply-adds a call is launch-bound: tuning could not pay for itself.
_TUNE_MIN_MACS = 1 << 20
_TUNE_WARMUP_MS = 5
_TUNE_REP_MS = 20
_MAX_TILE_CANDIDATES = 6
# Split-K partials are fp32 [SPLIT, N·K (+N)]; cap their size (and keep offsets in int32).
_SPLIT_MAX_BYTES = 64 << 20
# Each split must run at least this many reduction steps when chosen automatically.
_SPLIT_MIN_STEPS = 4

# (BLOCK_ROWS, BLOCK_COLS, BLOCK_RED, num_warps, num_stages), largest tiles first. Operand
# buffers of the biggest: 144 KiB (16-bit) and 96 KiB (fp32); compiled for sm_90 the 16-bit one
# took 168 KB of shared memory in all (H100: 227 KB). Configs a GPU cannot run are skipped by
# the tuner.
_TILES_HALF = (
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (32, 64, 64, 4, 4),
)
_TILES_FP32 = (
    (128, 128, 32, 8, 3),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (32, 64, 32, 4, 4),
    (32, 32, 32, 4, 4),
)

# (kernel, device index, dtype, dot precision, rows, cols, reduction) -> config; the batch
# dimension of the key is bucketed (see _bucket).
_TUNED: dict[tuple, dict] = {}
_log = logging.getLogger("fa_triton.autotune")


def _bucket(batch: int) -> int:
    """The batch size's autotuning bucket: the next power of two (at least 16), so that
    batches of 100 and 120 rows share one tuned config instead of tuning twice."""
    return max(16, triton.next_power_of_2(batch))


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _max_split(batch: int, cols_total: int, block_red: int, min_steps: int) -> int:
    """Most batch slices allowed: each at least `min_steps` reduction blocks long, partials
    [split, cols_total] in fp32 under _SPLIT_MAX_BYTES and int32-addressable."""
    by_rows = max(1, triton.cdiv(batch, block_red) // min_steps)
    by_bytes = max(1, _SPLIT_MAX_BYTES // (4 * max(1, cols_total)))
    by_offsets = max(1, _INT32_MAX // max(1, cols_total))
    return min(by_rows, by_bytes, by_offsets)


def _split_plan(batch: int, split: int, block_red: int) -> tuple[int, int]:
    """(slices actually used, rows per slice): rows per slice is a multiple of block_red and
    no slice is empty, so fewer than `split` slices may result."""
    rows_per_split = triton.cdiv(triton.cdiv(batch, max(1, split)), block_red) * block_red
    return triton.cdiv(batch, rows_per_split), rows_per_split


def _make_config(block_rows, block_cols, block_red, num_warps, num_stages, split=1) -> dict:
    return dict(BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, BLOCK_RED=block_red, GROUP=8,
                num_warps=num_warps, num_stages=num_stages, SPLIT=split)


@functools.lru_cache(maxsize=4096)
def _heuristic_config(kernel: str, rows: int, cols: int, red: int, dtype: torch.dtype, sms: int,
                      bias_grad: bool = False) -> dict:
    """The config used without tuning (and the first autotuning candidate)."""
    if INTERPRETED:
        # Fewer, larger programs: the interpreter's cost is per program and per loop step.
        return _make_config(_block(rows, 64), _block(cols, 64), _block(red, 64), 4, 1)
    block_red = _block(red, 32 if dtype == torch.float32 else 64)
    block_rows, block_cols = _block(rows, 128), _block(cols, 128)
    # Small outputs: smaller tiles, so that more SMs get work. backward_weight with a long
    # batch keeps 64x64 tiles and fills the GPU by splitting the batch instead.
    long_batch = kernel == "backward_weight" and red >= 2 * _SPLIT_MIN_STEPS * block_red
    min_area = 64 * 64 if long_batch else 32 * 32
    while triton.cdiv(rows, block_rows) * triton.cdiv(cols, block_cols) < sms and block_rows * block_cols > min_area:
        if block_rows >= block_cols and block_rows > 16:
            block_rows //= 2
        elif block_cols > 16:
            block_cols //= 2
        else:
            break
    num_warps = 8 if block_rows * block_cols >= 128 * 128 else 4
    split = 1
    if long_batch:
        tiles = triton.cdiv(rows, block_rows) * triton.cdiv(cols, block_cols)
        if 2 * tiles <= sms:
            cols_total = rows * cols + (rows if bias_grad else 0)
            split = min(triton.cdiv(sms, tiles), _max_split(red, cols_total, block_red, _SPLIT_MIN_STEPS))
    return _make_config(block_rows, block_cols, block_red, num_warps, 3, split)


def _candidate_configs(kernel: str, rows: int, cols: int, red: int, dtype: torch.dtype, sms: int,
                       bias_grad: bool = False) -> list[dict]:
    """Autotuning candidates for one problem: the heuristic config, then the tile table clamped
    to the problem (duplicates dropped); for backward_weight each tile also with split-K."""
    heuristic = _heuristic_config(kernel, rows, cols, red, dtype, sms, bias_grad)
    tiles_table = _TILES_FP32 if dtype == torch.float32 else _TILES_HALF
    # When 128x128 tiles already give two waves, smaller tiles only lose operand reuse.
    many_tiles = triton.cdiv(rows, 128) * triton.cdiv(cols, 128) >= 2 * sms
    tiles = [(heuristic["BLOCK_ROWS"], heuristic["BLOCK_COLS"], heuristic["BLOCK_RED"],
              heuristic["num_warps"], heuristic["num_stages"])]
    for block_rows, block_cols, block_red, num_warps, num_stages in tiles_table:
        tile = (_block(rows, block_rows), _block(cols, block_cols), _block(red, block_red), num_warps, num_stages)
        if many_tiles and tile[0] * tile[1] < 128 * 128:
            continue
        if tile not in tiles:
            tiles.append(tile)
    tiles = tiles[:_MAX_TILE_CANDIDATES]

    configs = [heuristic]
    for tile in tiles:
        splits = {1}
        if kernel == "backward_weight":
            block_rows, block_cols, block_red = tile[:3]
            n_tiles = triton.cdiv(rows, block_rows) * triton.cdiv(cols, block_cols)
            cols_total = rows * cols + (rows if bias_grad else 0)
            most = _max_split(red, cols_total, block_red, _SPLIT_MIN_STEPS)
            if n_tiles < sms:
                splits |= {min(most, triton.cdiv(waves * sms, n_tiles)) for waves in (1, 2, 4)}
        for split in sorted(splits):
            config = _make_config(*tile, split=split)
            if config not in configs:
                configs.append(config)
    return configs


def _benchmark_ms(fn) -> float:
    from triton.testing import do_bench

    ms = do_bench(fn, warmup=_TUNE_WARMUP_MS, rep=_TUNE_REP_MS, quantiles=[0.5])
    # Some Triton versions return a bare float for a single quantile, others a list.
    return float(ms[0] if isinstance(ms, (list, tuple)) else ms)


def _autotune(configs: list[dict], launch, timer=_benchmark_ms) -> dict:
    """The config of `configs` whose `launch(config)` times fastest under `timer`.

    A config that fails to compile or launch (out of shared memory on a smaller GPU) is
    skipped; if none runs, the first error is raised.
    """
    best, best_ms, first_error, timings = None, math.inf, None, []
    for config in configs:
        try:
            ms = timer(lambda: launch(config))
        except Exception as err:  # noqa: BLE001 - any failure just disqualifies this config
            first_error = first_error or err
            timings.append((config, f"failed: {type(err).__name__}"))
            continue
        timings.append((config, ms))
        if ms < best_ms:
            best, best_ms = config, ms
    if best is None:
        raise RuntimeError(f"fa_triton autotuning: none of {len(configs)} configs ran; first error: {first_error}") \
            from first_error
    _log.debug("autotune: %d configs, best %s (%.4f ms); all: %s", len(configs), best, best_ms, timings)
    return best


def _tracing() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _select_config(kernel: str, rows: int, cols: int, red: int, batch_axis: str, bias_grad: bool,
                   tensor: torch.Tensor, launch) -> dict:
    """The config for this call: tuned once per (kernel, device, dtype, shape bucket) on a GPU,
    the heuristic config under the interpreter, for launch-bound sizes, or with tuning off."""
    dtype, device = tensor.dtype, tensor.device
    sms = _sm_count(device)
    if (INTERPRETED or not _AUTOTUNE or device.type != "cuda" or rows * cols * red < _TUNE_MIN_MACS
            or _tracing()):
        return _heuristic_config(kernel, rows, cols, red, dtype, sms, bias_grad)
    dims = {"rows": rows, "cols": cols, "red": red}
    dims[batch_axis] = _bucket(dims[batch_axis])
    key = (kernel, device.index, dtype, _dot_precision(dtype), bias_grad, dims["rows"], dims["cols"], dims["red"])
    config = _TUNED.get(key)
    if config is None:
        if torch.cuda.is_current_stream_capturing():
            # Timing cannot run inside CUDA-graph capture; tune on a later, uncaptured call.
            return _heuristic_config(kernel, rows, cols, red, dtype, sms, bias_grad)
        config = _TUNED[key] = _autotune(_candidate_configs(kernel, rows, cols, red, dtype, sms, bias_grad), launch)
    return config


def _on_device_of(tensor: torch.Tensor):
    # Triton launches on the *current* CUDA device (and do_bench allocates there), not on the
    # tensors' own: make the tensors' device current for the launch and any tuning.
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _check_config(config: dict) -> dict:
    missing = {"BLOCK_ROWS", "BLOCK_COLS", "BLOCK_RED"} - set(config)
    if missing:
        raise ValueError(f"config must give {sorted(missing)}, got keys {sorted(config)}")
    return {**_make_config(16, 16, 16, 4, 3), **config}


# --------------------------------------------------------------------------- launchers

def fa_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    negative_slope: float = 0.0,
    store_preact: bool = False,
    out: torch.Tensor | None = None,
    *,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused ``y = f(x Wᵀ + b)``.

    Args: x [M, K] (any strides), weight [N, K], bias [N] or None; ``out``, an optional
    [M, N] tensor of x's dtype to write y into; ``config``, block sizes to use instead of
    the tuned ones (keys as in ``_make_config``; for tests and experiments).
    Returns: y [M, N], and z [M, N] when ``store_preact`` (else None).
    """
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype) if out is None else out
    # z shares y's strides: the kernel addresses both with one set of offsets.
    preact = torch.empty_strided(y.shape, y.stride(), device=x.device, dtype=x.dtype) if store_preact else None
    if M == 0:
        return y, preact
    use_int64 = _needs_int64(x, weight, y)

    def launch(cfg):
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
        _fa_linear_forward_kernel[grid](
            x, weight, bias if bias is not None else y, y, preact if preact is not None else y,
            M, N, K,
            x.stride(0), x.stride(1),
            weight.stride(0), weight.stride(1),
            y.stride(0), y.stride(1),
            float(negative_slope),
            HAS_BIAS=bias is not None, STORE_PREACT=store_preact, ACTIVATION=activation,
            INPUT_PRECISION=_dot_precision(x.dtype), USE_INT64=use_int64,
            BLOCK_M=cfg["BLOCK_ROWS"], BLOCK_N=cfg["BLOCK_COLS"], BLOCK_K=cfg["BLOCK_RED"], GROUP_M=cfg["GROUP"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )

    with _on_device_of(x):
        cfg = _check_config(config) if config is not None else _select_config("forward", M, N, K, "rows", False, x,
                                                                              launch)
        launch(cfg)
    return y, preact


def fa_linear_backward_input(
    grad_y: torch.Tensor,
    saved: torch.Tensor | None,
    feedback: torch.Tensor,
    activation: str,
    negative_slope: float = 0.0,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """``grad_x = (g ⊙ f'(z)) B``.

    Args: grad_y [M, N], saved [M, N] (y or z, see ``saves_preactivation``; None for
    identity), feedback [N, K]; ``config`` as in :func:`fa_linear_forward`.
    Returns grad_x [M, K] contiguous, in feedback's dtype.
    """
    M, N = grad_y.shape
    K = feedback.shape[1]
    grad_x = torch.empty((M, K), device=grad_y.device, dtype=feedback.dtype)
    if M == 0:
        return grad_x
    saved_arg = saved if saved is not None else grad_y
    use_int64 = _needs_int64(grad_y, saved_arg, feedback, grad_x)

    def launch(cfg):
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(K, META["BLOCK_K"]),)  # noqa: E731
        _fa_linear_backward_input_kernel[grid](
            grad_y, saved_arg, feedback, grad_x,
            M, N, K,
            grad_y.stride(0), grad_y.stride(1),
            saved_arg.stride(0), saved_arg.stride(1),
            feedback.stride(0), feedback.stride(1),
            grad_x.stride(0), grad_x.stride(1),
            float(negative_slope),
            ACTIVATION=activation, INPUT_PRECISION=_dot_precision(feedback.dtype), USE_INT64=use_int64,
            BLOCK_M=cfg["BLOCK_ROWS"], BLOCK_K=cfg["BLOCK_COLS"], BLOCK_N=cfg["BLOCK_RED"], GROUP_M=cfg["GROUP"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )

    with _on_device_of(feedback):
        cfg = (_check_config(config) if config is not None
               else _select_config("backward_input", M, K, N, "rows", False, feedback, launch))
        launch(cfg)
    return grad_x


def _reduce_splits(partial: torch.Tensor, grad_w: torch.Tensor, grad_b: torch.Tensor | None) -> None:
    """grad_w (contiguous) and grad_b from the fp32 split-K partials [splits, N·K (+N)]."""
    numel = partial.shape[1]
    grid = lambda META: (triton.cdiv(numel, META["BLOCK"]),)  # noqa: E731
    _split_sum_kernel[grid](
        partial, grad_w, grad_b if grad_b is not None else grad_w,
        grad_w.numel(), numel, partial.shape[0],
        partial.stride(0),
        BLOCK=1024, num_warps=4,
    )


def fa_linear_backward_weight(
    grad_y: torch.Tensor,
    saved: torch.Tensor | None,
    x: torch.Tensor,
    activation: str,
    negative_slope: float = 0.0,
    bias_grad: bool = True,
    *,
    split_k: int | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``grad_W = δᵀ x`` and ``grad_b = Σ_rows δ`` with ``δ = g ⊙ f'(z)``.

    Args: grad_y [M, N], saved [M, N] or None (identity), x [M, K]; ``split_k``, at most
    this many batch slices reduced by separate programs and then summed in a fixed order
    (None: tuned; 1: no split); ``config`` as in :func:`fa_linear_forward`.
    Returns: grad_W [N, K] and grad_b [N] (None unless ``bias_grad``), in x's dtype.
    """
    if split_k is not None and (isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"split_k must be None or an int >= 1, got {split_k!r}")
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
    use_int64 = _needs_int64(grad_y, saved_arg, x, grad_w)
    cols_total = N * K + (N if bias_grad else 0)

    def launch(cfg):
        splits, rows_per_split = _split_plan(M, cfg["SPLIT"], cfg["BLOCK_RED"])
        if splits == 1:
            w_out, b_out, stride_ws, stride_bs, partial = grad_w, grad_b, 0, 0, None
        else:
            partial = torch.empty((splits, cols_total), device=x.device, dtype=torch.float32)
            w_out, stride_ws = partial, partial.stride(0)
            b_out, stride_bs = (partial[:, N * K:], partial.stride(0)) if bias_grad else (None, 0)
        grid = lambda META: (triton.cdiv(N, META["BLOCK_N"]) * triton.cdiv(K, META["BLOCK_K"]), splits)  # noqa: E731
        _fa_linear_backward_weight_kernel[grid](
            grad_y, saved_arg, x, w_out, b_out if b_out is not None else w_out,
            M, N, K, rows_per_split,
            grad_y.stride(0), grad_y.stride(1),
            saved_arg.stride(0), saved_arg.stride(1),
            x.stride(0), x.stride(1),
            stride_ws, K if partial is not None else grad_w.stride(0), 1 if partial is not None else grad_w.stride(1),
            stride_bs,
            float(negative_slope),
            HAS_BIAS_GRAD=bias_grad, ACTIVATION=activation, INPUT_PRECISION=_dot_precision(x.dtype),
            USE_INT64=use_int64,
            BLOCK_N=cfg["BLOCK_ROWS"], BLOCK_K=cfg["BLOCK_COLS"], BLOCK_M=cfg["BLOCK_RED"], GROUP_N=cfg["GROUP"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        if partial is not None:
            _reduce_splits(partial, grad_w, grad_b)

    with _on_device_of(x):
        if config is not None:
            cfg = _check_config(config)
        else:
            cfg = _select_config("backward_weight", N, K, M, "red", bias_grad, x, launch)
        if split_k is not None:
            # A forced split may use slices of a single reduction block (tests, experiments).
            cfg = {**cfg, "SPLIT": min(split_k, _max_split(M, cols_total, cfg["BLOCK_RED"], 1))}
        launch(cfg)
    return grad_w, grad_b
