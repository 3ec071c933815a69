"""The ``@triton.jit`` kernels of the feedback-alignment linear layer.

Shapes (nn.Linear's layout; M rows of the flattened batch, K = in_features, N = out_features)::

    x: [M, K]   weight W: [N, K]   feedback B: [N, K]   bias b: [N]
    forward:          z = x Wᵀ + b,  y = f(z)                       -> y [M, N]
    backward input:   grad_x = (g ⊙ f'(z)) B                        -> [M, K]
    backward weight:  grad_W = (g ⊙ f'(z))ᵀ x,  grad_b = Σ_rows δ   -> [N, K], [N]

Each job has a pointer kernel (any strides, masked loads, int64 offsets on request) and a
tensor-descriptor (TMA) kernel for operands whose rows are 16-byte aligned with a unit last
stride. All accumulate in fp32, in a fixed order, with no atomics: the same inputs and launch
config give bitwise the same result.

- δ = g ⊙ f'(z) is formed as g is loaded. The backward-input kernels can also store δ once
  (STORE_DELTA, by the programs of the first column of output tiles, which see every δ
  element once); the backward-weight kernels then read δ with ACTIVATION="identity" and run
  a plain GEMM. Without grad_x (the first layer) the weight kernel forms δ itself.
- The backward-weight pointer kernel reads δᵀ tiles [BLOCK_N, BLOCK_M] straight through g's
  strides, so the dot takes them with no transpose in registers.
- Split reductions (SPLIT): the forward kernel over K and the backward-weight kernels over the
  batch write fp32 partials [splits, ...]; one more kernel adds them in slice order (the
  forward's also applies bias and activation). This fills the GPU when the output has few
  tiles (batch 64, or a 64→10 layer at batch 8192).

Argument order follows Triton's tutorials: pointers (or descriptors), sizes, strides, scalars,
constexpr flags, constexpr blocks.
"""

import triton
import triton.language as tl

from .jit_helpers import activation_and_extra, apply_activation, feedback_tile, grouped_tile, local_error

#: Every kernel the launchers run (benchmarks and tests stub or record them by these names).
KERNEL_NAMES = ("forward_kernel", "forward_tma_kernel", "forward_split_epilogue_kernel", "backward_input_kernel",
                "backward_input_tma_kernel", "backward_weight_kernel", "backward_weight_tma_kernel",
                "split_sum_kernel", "dfa_delta_kernel")

# ----------------------------------------------------------------------------------- forward


@triton.jit
def _forward_epilogue(acc, offs_m, offs_n, mask_m, N, bias_ptr, y_ptr, extra_ptr, stride_ym, stride_yn,
                      negative_slope, HAS_BIAS: tl.constexpr, STORE_EXTRA: tl.constexpr, ACTIVATION: tl.constexpr):
    """Bias, activation and masked stores of one fp32 output tile (y, and the extra tensor)."""
    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_offs = offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = mask_m[:, None] & mask_n[None, :]
    if STORE_EXTRA:
        y, extra = activation_and_extra(acc, ACTIVATION, negative_slope)
        tl.store(extra_ptr + out_offs, extra.to(extra_ptr.dtype.element_ty), mask=mask)
    else:
        y = apply_activation(acc, ACTIVATION, negative_slope)
    tl.store(y_ptr + out_offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _forward_epilogue_tma(acc, off_m, off_n, N, bias_ptr, y_desc, extra_desc, negative_slope,
                          HAS_BIAS: tl.constexpr, STORE_EXTRA: tl.constexpr, ACTIVATION: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """_forward_epilogue with the stores through tensor descriptors (BLOCK_N columns from off_n)."""
    if HAS_BIAS:
        offs_n = off_n + tl.arange(0, BLOCK_N)
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if STORE_EXTRA:
        y, extra = activation_and_extra(acc, ACTIVATION, negative_slope)
        extra_desc.store([off_m, off_n], extra.to(extra_desc.dtype))
    else:
        y = apply_activation(acc, ACTIVATION, negative_slope)
    y_desc.store([off_m, off_n], y.to(y_desc.dtype))


@triton.jit
def _halves(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The left and right [BLOCK_M, BLOCK_N // 2] halves of a tile (tutorial 09's epilogue subtiles)."""
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def forward_kernel(
    # pointers
    x_ptr, weight_ptr, bias_ptr, y_ptr, extra_ptr, partial_ptr,
    # sizes
    M, N, K, k_per_split,
    # strides
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ym, stride_yn,
    # scalars
    negative_slope,
    # flags
    HAS_BIAS: tl.constexpr, STORE_EXTRA: tl.constexpr, ACTIVATION: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, USE_INT64: tl.constexpr, SPLIT: tl.constexpr, EPILOGUE_HALVES: tl.constexpr,
    # blocks
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[M, N] = f(x[M, K] @ W[N, K]ᵀ + b[N]); when STORE_EXTRA also the extra tensor that
    backward reads (z, or f'(z) for gelu; jit_helpers.activation_and_extra), with y's strides.

    EPILOGUE_HALVES: the epilogue runs on the tile's two column halves in turn, which keeps a
    costly activation (gelu's erf and exp) on large tiles within the register file.

    SPLIT: program (tile, s), s = program_id(1), sums only K range [s·k_per_split, …) and
    stores its raw fp32 sum in partial[s] ([splits, M, N], contiguous); the epilogue is then
    forward_split_epilogue_kernel's.
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if USE_INT64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    wt_cols = weight_ptr + offs_n[None, :] * stride_wn
    if SPLIT:
        k_begin = tl.program_id(1) * k_per_split
        k_end = tl.minimum(K, k_begin + k_per_split)
    else:
        k_begin = 0
        k_end = K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        if USE_INT64:
            offs_k = offs_k.to(tl.int64)
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # Wᵀ tile [BLOCK_K, BLOCK_N] read straight from W's [N, K] layout.
        wt = tl.load(wt_cols + offs_k[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x, wt, acc, input_precision=INPUT_PRECISION)

    if SPLIT:
        partial = partial_ptr + tl.program_id(1) * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(partial, acc, mask=mask_m[:, None] & mask_n[None, :])
    elif EPILOGUE_HALVES:
        acc_left, acc_right = _halves(acc, BLOCK_M, BLOCK_N)
        offs_left = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
        if USE_INT64:
            offs_left = offs_left.to(tl.int64)
        _forward_epilogue(acc_left, offs_m, offs_left, mask_m, N, bias_ptr, y_ptr, extra_ptr, stride_ym, stride_yn,
                          negative_slope, HAS_BIAS, STORE_EXTRA, ACTIVATION)
        _forward_epilogue(acc_right, offs_m, offs_left + BLOCK_N // 2, mask_m, N, bias_ptr, y_ptr, extra_ptr,
                          stride_ym, stride_yn, negative_slope, HAS_BIAS, STORE_EXTRA, ACTIVATION)
    else:
        _forward_epilogue(acc, offs_m, offs_n, mask_m, N, bias_ptr, y_ptr, extra_ptr, stride_ym, stride_yn,
                          negative_slope, HAS_BIAS, STORE_EXTRA, ACTIVATION)


@triton.jit
def forward_split_epilogue_kernel(
    # pointers
    partial_ptr, bias_ptr, y_ptr, extra_ptr,
    # sizes
    M, N, splits,
    # strides
    stride_ym, stride_yn,
    # scalars
    negative_slope,
    # flags
    HAS_BIAS: tl.constexpr, STORE_EXTRA: tl.constexpr, ACTIVATION: tl.constexpr,
    # blocks
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """z = Σ_s partial[s] (s in order) + b; y = f(z); stores y, and the extra tensor when STORE_EXTRA."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask = mask_m[:, None] & (offs_n < N)[None, :]
    partial = partial_ptr + offs_m[:, None] * N + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(partial + s * M * N, mask=mask, other=0.0)
    _forward_epilogue(acc, offs_m, offs_n, mask_m, N, bias_ptr, y_ptr, extra_ptr, stride_ym, stride_yn,
                      negative_slope, HAS_BIAS, STORE_EXTRA, ACTIVATION)


@triton.jit
def forward_tma_kernel(
    # descriptors and pointers
    x_desc, weight_desc, bias_ptr, y_desc, extra_desc,
    # sizes
    M, N, K,
    # scalars
    negative_slope,
    # flags
    HAS_BIAS: tl.constexpr, STORE_EXTRA: tl.constexpr, ACTIVATION: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, EPILOGUE_HALVES: tl.constexpr,
    # blocks
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """forward_kernel through tensor descriptors: x [M, K] and W [N, K] tiles (W's as stored,
    used transposed by the dot); y and the extra tensor are stored through descriptors of
    [BLOCK_M, BLOCK_N] blocks, or [BLOCK_M, BLOCK_N // 2] with EPILOGUE_HALVES. Out-of-range
    elements load as 0 and are not stored."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = x_desc.load([off_m, k0])
        w = weight_desc.load([off_n, k0])
        acc = tl.dot(x, w.T, acc, input_precision=INPUT_PRECISION)
    if EPILOGUE_HALVES:
        acc_left, acc_right = _halves(acc, BLOCK_M, BLOCK_N)
        _forward_epilogue_tma(acc_left, off_m, off_n, N, bias_ptr, y_desc, extra_desc, negative_slope,
                              HAS_BIAS, STORE_EXTRA, ACTIVATION, BLOCK_N // 2)
        _forward_epilogue_tma(acc_right, off_m, off_n + BLOCK_N // 2, N, bias_ptr, y_desc, extra_desc, negative_slope,
                              HAS_BIAS, STORE_EXTRA, ACTIVATION, BLOCK_N // 2)
    else:
        _forward_epilogue_tma(acc, off_m, off_n, N, bias_ptr, y_desc, extra_desc, negative_slope,
                              HAS_BIAS, STORE_EXTRA, ACTIVATION, BLOCK_N)


# ---------------------------------------------------------------------------- backward input


@triton.jit
def backward_input_kernel(
    # pointers
    grad_y_ptr, saved_ptr, feedback_ptr, weight_ptr, counter_ptr, grad_x_ptr, delta_ptr,
    # sizes
    M, N, K,
    # strides
    stride_gm, stride_gn,
    stride_sm, stride_sn,
    stride_bn, stride_bk,
    stride_wn, stride_wk,
    stride_gxm, stride_gxk,
    stride_dm,
    # scalars
    negative_slope, feedback_scale, seed,
    # flags
    ACTIVATION: tl.constexpr, FEEDBACK: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_INT64: tl.constexpr,
    STORE_DELTA: tl.constexpr,
    # blocks
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """grad_x[M, K] = (g[M, N] ⊙ f'(saved[M, N])) @ B[N, K]: tiles over (M, K), reduces over N.

    B's tiles come from the rule FEEDBACK (jit_helpers.feedback_tile): loaded from feedback
    ("matrix"), or formed from W's sign (weight) with a scale, stored magnitudes (feedback) or
    magnitudes drawn from (seed, the draw counter at counter_ptr).
    STORE_DELTA: the programs of the first K tile also store δ (rounded to B's dtype, as the
    dot uses it) into delta [M, N] (row stride stride_dm, unit column stride).
    """
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
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
    w_cols = weight_ptr + offs_k[None, :] * stride_wk
    d_rows = delta_ptr + offs_m[:, None] * stride_dm
    draw_offset = 0
    if FEEDBACK == "random_sign":
        draw_offset = tl.load(counter_ptr) * N * K

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        if USE_INT64:
            offs_n = offs_n.to(tl.int64)
        tile_mask = mask_m[:, None] & mask_n[None, :]
        g = tl.load(g_rows + offs_n[None, :] * stride_gn, mask=tile_mask, other=0.0)
        feedback = feedback_tile(b_cols + offs_n[:, None] * stride_bn, w_cols + offs_n[:, None] * stride_wn,
                                 mask_n[:, None] & mask_k[None, :],
                                 offs_n[:, None].to(tl.int64) * K + offs_k[None, :].to(tl.int64), draw_offset, seed,
                                 feedback_scale, FEEDBACK)
        if ACTIVATION != "identity":
            s = tl.load(s_rows + offs_n[None, :] * stride_sn, mask=tile_mask, other=0.0)
            g = local_error(g, s, ACTIVATION, negative_slope)
        # δ is rounded to the operand dtype, as PyTorch's own δ would be.
        delta = g.to(feedback.dtype)
        if STORE_DELTA:
            tl.store(d_rows + offs_n[None, :], delta, mask=tile_mask & (pid_k == 0))
        acc = tl.dot(delta, feedback, acc, input_precision=INPUT_PRECISION)

    out = grad_x_ptr + offs_m[:, None] * stride_gxm + offs_k[None, :] * stride_gxk
    tl.store(out, acc.to(grad_x_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def backward_input_tma_kernel(
    # descriptors and pointers
    grad_y_desc, saved_desc, feedback_desc, grad_x_desc, delta_ptr,
    # sizes
    M, N, K,
    # strides
    stride_dm,
    # scalars
    negative_slope,
    # flags
    ACTIVATION: tl.constexpr, INPUT_PRECISION: tl.constexpr, STORE_DELTA: tl.constexpr,
    # blocks
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """backward_input_kernel through tensor descriptors (g, saved [M, N]; B [N, K]; grad_x [M, K])."""
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_k = pid_k * BLOCK_K
    offs_m = off_m + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        g = grad_y_desc.load([off_m, n0])
        feedback = feedback_desc.load([n0, off_k])
        if ACTIVATION != "identity":
            g = local_error(g, saved_desc.load([off_m, n0]), ACTIVATION, negative_slope)
        delta = g.to(feedback.dtype)
        if STORE_DELTA:
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask = (offs_m < M)[:, None] & (offs_n < N)[None, :] & (pid_k == 0)
            tl.store(delta_ptr + offs_m[:, None] * stride_dm + offs_n[None, :], delta, mask=mask)
        acc = tl.dot(delta, feedback, acc, input_precision=INPUT_PRECISION)
    grad_x_desc.store([off_m, off_k], acc.to(grad_x_desc.dtype))


# --------------------------------------------------------------------------- backward weight


@triton.jit
def backward_weight_kernel(
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
    # blocks
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    """grad_W[N, K] = δᵀ @ x and grad_b[N] = Σ_m δ, δ = g ⊙ f'(saved): tiles over (N, K), reduces over M.

    δᵀ is loaded as [BLOCK_N, BLOCK_M] tiles through g's strides (no transpose in registers).
    The programs of the first K-tile column also own grad_b: they sum the δ tiles they hold.
    Split over the batch: program (tile, s), s = program_id(1), reduces rows
    [s·rows_per_split, (s+1)·rows_per_split) into slice s of grad_w/grad_b (fp32 partials,
    stride_gws/stride_gbs apart), which split_sum_kernel adds in order. Unsplit: rows_per_split = M.
    """
    pid_n, pid_k = grouped_tile(tl.program_id(0), N, K, BLOCK_N, BLOCK_K, GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    if USE_INT64:
        offs_n = offs_n.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    mask_n = offs_n < N
    mask_k = offs_k < K
    g_rows = grad_y_ptr + offs_n[:, None] * stride_gn
    s_rows = saved_ptr + offs_n[:, None] * stride_sn
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
        tile_mask = mask_n[:, None] & mask_m[None, :]
        x = tl.load(x_cols + offs_m[:, None] * stride_xm, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        delta_t = tl.load(g_rows + offs_m[None, :] * stride_gm, mask=tile_mask, other=0.0)
        if ACTIVATION != "identity":
            s = tl.load(s_rows + offs_m[None, :] * stride_sm, mask=tile_mask, other=0.0)
            delta_t = local_error(delta_t, s, ACTIVATION, negative_slope)
        if HAS_BIAS_GRAD:
            bias_acc += tl.sum(delta_t.to(tl.float32), axis=1)
        acc = tl.dot(delta_t.to(x.dtype), x, acc, input_precision=INPUT_PRECISION)

    out = grad_w_ptr + offs_n[:, None] * stride_gwn + offs_k[None, :] * stride_gwk
    tl.store(out, acc.to(grad_w_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])
    if HAS_BIAS_GRAD:
        tl.store(grad_b_ptr + offs_n, bias_acc.to(grad_b_ptr.dtype.element_ty), mask=mask_n & (pid_k == 0))


@triton.jit
def backward_weight_tma_kernel(
    # descriptors and pointers
    grad_y_desc, saved_desc, x_desc, grad_w_ptr, grad_b_ptr,
    # sizes
    M, N, K, rows_per_split,
    # strides
    stride_gws, stride_gwn, stride_gwk,
    stride_gbs,
    # scalars
    negative_slope,
    # flags
    HAS_BIAS_GRAD: tl.constexpr, ACTIVATION: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    # blocks
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    """backward_weight_kernel through tensor descriptors: g, saved [M, N] and x [M, K] tiles of
    BLOCK_M rows; the δ tile is used transposed by the dot. rows_per_split is a multiple of
    BLOCK_M, so a tile never crosses into the next slice; rows past M load as 0."""
    pid_n, pid_k = grouped_tile(tl.program_id(0), N, K, BLOCK_N, BLOCK_K, GROUP_N)
    off_n = pid_n * BLOCK_N
    off_k = pid_k * BLOCK_K
    pid_s = tl.program_id(1)
    m_begin = pid_s * rows_per_split
    m_end = tl.minimum(M, m_begin + rows_per_split)
    grad_w_ptr += pid_s * stride_gws
    grad_b_ptr += pid_s * stride_gbs

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        x = x_desc.load([m0, off_k])
        delta = grad_y_desc.load([m0, off_n])
        if ACTIVATION != "identity":
            delta = local_error(delta, saved_desc.load([m0, off_n]), ACTIVATION, negative_slope)
        if HAS_BIAS_GRAD:
            bias_acc += tl.sum(delta.to(tl.float32), axis=0)
        acc = tl.dot(delta.to(x.dtype).T, x, acc, input_precision=INPUT_PRECISION)

    offs_n = off_n + tl.arange(0, BLOCK_N)
    offs_k = off_k + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    out = grad_w_ptr + offs_n[:, None] * stride_gwn + offs_k[None, :] * stride_gwk
    tl.store(out, acc.to(grad_w_ptr.dtype.element_ty), mask=mask_n[:, None] & (offs_k < K)[None, :])
    if HAS_BIAS_GRAD:
        tl.store(grad_b_ptr + offs_n, bias_acc.to(grad_b_ptr.dtype.element_ty), mask=mask_n & (pid_k == 0))


@triton.jit
def split_sum_kernel(
    # pointers
    partial_ptr, grad_w_ptr, grad_b_ptr,
    # sizes
    numel_w, numel, splits,
    # strides
    stride_split,
    # blocks
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


# ------------------------------------------------------------------------------------- DFA


@triton.jit
def dfa_delta_kernel(
    # pointers
    error_ptr, feedback_ptr, saved_ptr, delta_ptr,
    # sizes
    M, N, K,
    # strides
    stride_em, stride_ek,
    stride_bk, stride_bn,
    stride_sm, stride_sn,
    stride_dm, stride_dn,
    # scalars
    negative_slope,
    # flags
    ACTIVATION: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_INT64: tl.constexpr,
    # blocks
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Direct feedback alignment: δ[M, N] = (e[M, K] @ B[K, N]) ⊙ f'(saved[M, N]).

    e is the output error (K = the network's outputs); B the hidden layers' feedback matrices
    side by side (N = their widths summed), so one GEMM projects e to every layer; f' is
    applied in the epilogue from the saved tensor (y, or f'(z) for gelu), and δ stored in its dtype.
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if USE_INT64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    e_rows = error_ptr + offs_m[:, None] * stride_em
    b_cols = feedback_ptr + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if USE_INT64:
            offs_k = offs_k.to(tl.int64)
        e = tl.load(e_rows + offs_k[None, :] * stride_ek, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_cols + offs_k[:, None] * stride_bk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(e.to(b.dtype), b, acc, input_precision=INPUT_PRECISION)
    mask = mask_m[:, None] & mask_n[None, :]
    if ACTIVATION != "identity":
        s = tl.load(saved_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn, mask=mask, other=0.0)
        acc = local_error(acc, s, ACTIVATION, negative_slope)
    out = delta_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn
    tl.store(out, acc.to(delta_ptr.dtype.element_ty), mask=mask)
