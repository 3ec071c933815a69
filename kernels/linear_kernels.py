"""The GEMM kernels of the feedback-alignment linear layer (the memory passes are in ``pass_kernels.py``).

Shapes (nn.Linear's layout; M rows of the flattened batch, K = in_features, N = out_features)::

    forward:          z = x Wᵀ + b,  y = f(z)        x [M, K], W [N, K]      -> y [M, N] (and z or f'(z))
    backward input:   grad_x = δ B                   δ [M, N], B [N, K]      -> grad_x [M, K]
    backward weight:  grad_W = δᵀ x                  δ [M, N], x [M, K]      -> grad_W [N, K]
    DFA:              δ = (e B) ⊙ f'(saved)          e [M, K], B [K, N]      -> δ [M, N]

Every main loop is the Triton tutorial GEMM's (tutorials 03 and 09): both operands from memory
into the dot, nothing else in the loop. The fusions sit where they cost nothing: bias and
activation (and what backward needs of f') in the forward's epilogue, f' in DFA's epilogue, and
δ = g ⊙ f'(z) with grad_b = Σ_rows δ in one memory pass before the backward GEMMs
(``pass_kernels.local_error_kernel``), so that both backward GEMMs read δ as a plain operand.

Each GEMM has a pointer kernel (any strides, masked loads, int64 offsets on request) and, but
DFA, a tensor-descriptor (TMA) kernel for operands whose rows are 16-byte aligned with a unit
last stride. All accumulate in fp32, in a fixed order, with no atomics: the same inputs and
launch config give bitwise the same result.

Split reductions (SPLIT): the forward over K and the backward-weight kernels over the batch
write fp32 partials [splits, ...]; one more kernel adds them in slice order (the forward's also
applies bias and activation). This fills the GPU when the output has few tiles (batch 64, or a
64→10 layer at batch 8192).

Stacked launches (the pointer kernels but DFA's): E models' layers — E seeds of one network
trained in one pass, ``torch.func.vmap`` over stacked parameters — run as one grid whose third
axis is the model (``jit_helpers.model_offset``, under the constexpr flag STACKED); each
operand's ``stride_*e`` is the distance between models (0 for an operand all models share). A
plain launch (STACKED false) passes 0s there and carries no model offset at all.

Argument order follows Triton's tutorials: pointers (or descriptors), sizes, strides, scalars,
constexpr flags, constexpr blocks.
"""

import triton
import triton.language as tl

from .jit_helpers import (
    activation_and_extra,
    activation_backward,
    apply_activation,
    grouped_tile,
    model_offset,
    released,
)

# ----------------------------------------------------------------------------------- forward


@triton.jit
def _forward_epilogue(acc, offs_m, offs_n, mask_m, N, bias_ptr, y_ptr, extra_ptr, stride_ym, stride_yn,
                      negative_slope, HAS_BIAS: tl.constexpr, STORE_EXTRA: tl.constexpr, ACTIVATION: tl.constexpr):
    """Bias, activation and masked stores of one fp32 output tile (y, and the extra tensor)."""
    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    else:
        acc = released(acc)
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
    else:
        acc = released(acc)
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
    # strides (stride_*e: between the models of a stacked launch; y's serve the extra tensor too)
    stride_xe, stride_xm, stride_xk,
    stride_we, stride_wn, stride_wk,
    stride_be,
    stride_ye, stride_ym, stride_yn,
    # scalars
    negative_slope,
    # flags
    HAS_BIAS: tl.constexpr, STORE_EXTRA: tl.constexpr, ACTIVATION: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, USE_INT64: tl.constexpr, SPLIT: tl.constexpr, EPILOGUE_HALVES: tl.constexpr,
    STACKED: tl.constexpr,
    # blocks
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[M, N] = f(x[M, K] @ W[N, K]ᵀ + b[N]); when STORE_EXTRA also the extra tensor that
    backward reads (z, or f'(z) for gelu; jit_helpers.activation_and_extra), with y's strides.

    EPILOGUE_HALVES: the epilogue runs on the tile's two column halves in turn, which keeps a
    costly activation (gelu's erf and exp) on large tiles within the register file.

    SPLIT: program (tile, s), s = program_id(1), sums only K range [s·k_per_split, …) and
    stores its raw fp32 sum in partial[s] ([splits, M, N], contiguous); the epilogue is then
    forward_split_epilogue_kernel's. A stacked launch (program_id(2) = the model) has no split.
    """
    x_ptr += model_offset(stride_xe, STACKED, USE_INT64)
    weight_ptr += model_offset(stride_we, STACKED, USE_INT64)
    bias_ptr += model_offset(stride_be, STACKED, USE_INT64)
    y_ptr += model_offset(stride_ye, STACKED, USE_INT64)
    extra_ptr += model_offset(stride_ye, STACKED, USE_INT64)
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if USE_INT64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    mask_m = offs_m < M
    if SPLIT:
        k_begin = tl.program_id(1) * k_per_split
        k_end = tl.minimum(K, k_begin + k_per_split)
    else:
        k_begin = 0
        k_end = K
    # As the tutorial: rows and columns past the edge wrap around (the loads need no mask on
    # them; the stores have one), pointers advance a block per step, only K is masked.
    x_ptrs = x_ptr + (offs_m % M)[:, None] * stride_xm + (k_begin + offs_k)[None, :] * stride_xk
    # Wᵀ tile [BLOCK_K, BLOCK_N] read straight from W's [N, K] layout.
    wt_ptrs = weight_ptr + (k_begin + offs_k)[:, None] * stride_wk + (offs_n % N)[None, :] * stride_wn
    x_step = BLOCK_K * stride_xk
    wt_step = BLOCK_K * stride_wk
    if USE_INT64:
        x_step = BLOCK_K * tl.cast(stride_xk, tl.int64)
        wt_step = BLOCK_K * tl.cast(stride_wk, tl.int64)

    # The first step is peeled off the loop (here and in every GEMM below): the accumulator is
    # then defined by a dot, not by zeros, and ptxas 12.8 (Triton 3.6's) keeps the wgmma chain
    # asynchronous (a zero-filled accumulator makes it serialize the chain, warning C7515).
    acc = tl.dot(tl.load(x_ptrs, mask=offs_k[None, :] < k_end - k_begin, other=0.0),
                 tl.load(wt_ptrs, mask=offs_k[:, None] < k_end - k_begin, other=0.0), input_precision=INPUT_PRECISION)
    for k0 in range(k_begin + BLOCK_K, k_end, BLOCK_K):
        x_ptrs += x_step
        wt_ptrs += wt_step
        x = tl.load(x_ptrs, mask=offs_k[None, :] < k_end - k0, other=0.0)
        wt = tl.load(wt_ptrs, mask=offs_k[:, None] < k_end - k0, other=0.0)
        acc = tl.dot(x, wt, acc, input_precision=INPUT_PRECISION)

    if SPLIT:
        partial = partial_ptr + tl.program_id(1) * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(partial, acc, mask=mask_m[:, None] & (offs_n < N)[None, :])
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
    x_desc, weight_desc, bias_ptr, y_desc, extra_desc, y_ptr, extra_ptr,
    # sizes
    M, N, K,
    # strides
    stride_ym, stride_yn,
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
    acc = tl.dot(x_desc.load([off_m, 0]), weight_desc.load([off_n, 0]).T, input_precision=INPUT_PRECISION)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        acc = tl.dot(x_desc.load([off_m, k0]), weight_desc.load([off_n, k0]).T, acc, input_precision=INPUT_PRECISION)
    if EPILOGUE_HALVES:
        # Two column halves through pointer stores (y and the extra tensor of a 128x256 tile
        # through descriptors spill on Triton 3.6).
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_left = off_n + tl.arange(0, BLOCK_N // 2)
        acc_left, acc_right = _halves(acc, BLOCK_M, BLOCK_N)
        _forward_epilogue(acc_left, offs_m, offs_left, offs_m < M, N, bias_ptr, y_ptr, extra_ptr, stride_ym,
                          stride_yn, negative_slope, HAS_BIAS, STORE_EXTRA, ACTIVATION)
        _forward_epilogue(acc_right, offs_m, offs_left + BLOCK_N // 2, offs_m < M, N, bias_ptr, y_ptr, extra_ptr,
                          stride_ym, stride_yn, negative_slope, HAS_BIAS, STORE_EXTRA, ACTIVATION)
    else:
        _forward_epilogue_tma(acc, off_m, off_n, N, bias_ptr, y_desc, extra_desc, negative_slope,
                              HAS_BIAS, STORE_EXTRA, ACTIVATION, BLOCK_N)


# ---------------------------------------------------------------------------- backward input


@triton.jit
def backward_input_kernel(
    # pointers
    delta_ptr, feedback_ptr, grad_x_ptr,
    # sizes
    M, N, K,
    # strides (stride_*e: between the models of a stacked launch)
    stride_de, stride_dm, stride_dn,
    stride_be, stride_bn, stride_bk,
    stride_gxe, stride_gxm, stride_gxk,
    # flags
    INPUT_PRECISION: tl.constexpr, USE_INT64: tl.constexpr, STACKED: tl.constexpr,
    # blocks
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """grad_x[M, K] = δ[M, N] @ B[N, K]: tiles over (M, K), reduces over N (the tutorial's A·B)."""
    delta_ptr += model_offset(stride_de, STACKED, USE_INT64)
    feedback_ptr += model_offset(stride_be, STACKED, USE_INT64)
    grad_x_ptr += model_offset(stride_gxe, STACKED, USE_INT64)
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    if USE_INT64:
        offs_m = offs_m.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    # As the tutorial: rows and columns past the edge wrap around (loads need no mask on them,
    # the store has one), pointers advance by a block per step, only the reduction is masked.
    d_ptrs = delta_ptr + (offs_m % M)[:, None] * stride_dm + offs_n[None, :] * stride_dn
    b_ptrs = feedback_ptr + offs_n[:, None] * stride_bn + (offs_k % K)[None, :] * stride_bk
    d_step = BLOCK_N * stride_dn
    b_step = BLOCK_N * stride_bn
    if USE_INT64:
        d_step = BLOCK_N * tl.cast(stride_dn, tl.int64)
        b_step = BLOCK_N * tl.cast(stride_bn, tl.int64)

    acc = tl.dot(tl.load(d_ptrs, mask=offs_n[None, :] < N, other=0.0),
                 tl.load(b_ptrs, mask=offs_n[:, None] < N, other=0.0), input_precision=INPUT_PRECISION)
    for n0 in range(BLOCK_N, N, BLOCK_N):
        d_ptrs += d_step
        b_ptrs += b_step
        delta = tl.load(d_ptrs, mask=offs_n[None, :] < N - n0, other=0.0)
        feedback = tl.load(b_ptrs, mask=offs_n[:, None] < N - n0, other=0.0)
        acc = tl.dot(delta, feedback, acc, input_precision=INPUT_PRECISION)

    out = grad_x_ptr + offs_m[:, None] * stride_gxm + offs_k[None, :] * stride_gxk
    tl.store(out, acc.to(grad_x_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_k < K)[None, :])


@triton.jit
def backward_input_tma_kernel(
    # descriptors
    delta_desc, feedback_desc, grad_x_desc,
    # sizes
    M, N, K,
    # flags
    INPUT_PRECISION: tl.constexpr,
    # blocks
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """backward_input_kernel through tensor descriptors (δ [M, N], B [N, K], grad_x [M, K])."""
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_k = pid_k * BLOCK_K
    acc = tl.dot(delta_desc.load([off_m, 0]), feedback_desc.load([0, off_k]), input_precision=INPUT_PRECISION)
    for n0 in range(BLOCK_N, N, BLOCK_N):
        acc = tl.dot(delta_desc.load([off_m, n0]), feedback_desc.load([n0, off_k]), acc,
                     input_precision=INPUT_PRECISION)
    grad_x_desc.store([off_m, off_k], acc.to(grad_x_desc.dtype))


# --------------------------------------------------------------------------- backward weight


@triton.jit
def backward_weight_kernel(
    # pointers
    delta_ptr, x_ptr, grad_w_ptr,
    # sizes
    M, N, K, rows_per_split,
    # strides (stride_*e: between the models of a stacked launch)
    stride_de, stride_dm, stride_dn,
    stride_xe, stride_xm, stride_xk,
    stride_gwe, stride_gws, stride_gwn, stride_gwk,
    # flags
    INPUT_PRECISION: tl.constexpr, USE_INT64: tl.constexpr, STACKED: tl.constexpr,
    # blocks
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    """grad_W[N, K] = δᵀ @ x (δ [M, N], x [M, K]): tiles over (N, K), reduces over the batch M.

    δᵀ is loaded as [BLOCK_N, BLOCK_M] tiles through δ's strides (the tutorial's Aᵀ·B read, no
    transpose in registers). Split over the batch: program (tile, s), s = program_id(1), reduces
    rows [s·rows_per_split, (s+1)·rows_per_split) into slice s of grad_w (fp32 partials
    stride_gws apart), which split_sum_kernel adds in order. Unsplit: rows_per_split = M. A
    stacked launch (program_id(2) = the model) has no split.
    """
    delta_ptr += model_offset(stride_de, STACKED, USE_INT64)
    x_ptr += model_offset(stride_xe, STACKED, USE_INT64)
    grad_w_ptr += model_offset(stride_gwe, STACKED, USE_INT64)
    pid_n, pid_k = grouped_tile(tl.program_id(0), N, K, BLOCK_N, BLOCK_K, GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    pid_s = tl.program_id(1)
    m_begin = pid_s * rows_per_split
    m_end = tl.minimum(M, m_begin + rows_per_split)
    if USE_INT64:
        offs_n = offs_n.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
        offs_m = offs_m.to(tl.int64)
        m_begin = m_begin.to(tl.int64)
    mask_n = offs_n < N
    mask_k = offs_k < K
    # As the tutorial: columns past the edge wrap around, pointers advance a block per step,
    # only the batch is masked.
    d_ptrs = delta_ptr + (offs_n % N)[:, None] * stride_dn + (m_begin + offs_m)[None, :] * stride_dm
    x_ptrs = x_ptr + (m_begin + offs_m)[:, None] * stride_xm + (offs_k % K)[None, :] * stride_xk
    d_step = BLOCK_M * stride_dm
    x_step = BLOCK_M * stride_xm
    if USE_INT64:
        d_step = BLOCK_M * tl.cast(stride_dm, tl.int64)
        x_step = BLOCK_M * tl.cast(stride_xm, tl.int64)

    acc = tl.dot(tl.load(d_ptrs, mask=offs_m[None, :] < m_end - m_begin, other=0.0),
                 tl.load(x_ptrs, mask=offs_m[:, None] < m_end - m_begin, other=0.0), input_precision=INPUT_PRECISION)
    for m0 in range(m_begin + BLOCK_M, m_end, BLOCK_M):
        d_ptrs += d_step
        x_ptrs += x_step
        delta_t = tl.load(d_ptrs, mask=offs_m[None, :] < m_end - m0, other=0.0)
        x = tl.load(x_ptrs, mask=offs_m[:, None] < m_end - m0, other=0.0)
        acc = tl.dot(delta_t, x, acc, input_precision=INPUT_PRECISION)

    out = grad_w_ptr + pid_s * stride_gws + offs_n[:, None] * stride_gwn + offs_k[None, :] * stride_gwk
    tl.store(out, acc.to(grad_w_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])


@triton.jit
def backward_weight_tma_kernel(
    # descriptors and pointers
    delta_desc, x_desc, grad_w_ptr,
    # sizes
    M, N, K, rows_per_split,
    # strides
    stride_gws, stride_gwn, stride_gwk,
    # flags
    INPUT_PRECISION: tl.constexpr,
    # blocks
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    """backward_weight_kernel through tensor descriptors: δ [M, N] and x [M, K] tiles of BLOCK_M
    rows; the dot takes the δ tile transposed from shared memory. rows_per_split is a multiple
    of BLOCK_M, so a tile never crosses into the next slice; rows past M load as 0."""
    pid_n, pid_k = grouped_tile(tl.program_id(0), N, K, BLOCK_N, BLOCK_K, GROUP_N)
    off_n = pid_n * BLOCK_N
    off_k = pid_k * BLOCK_K
    pid_s = tl.program_id(1)
    m_begin = pid_s * rows_per_split
    m_end = tl.minimum(M, m_begin + rows_per_split)
    acc = tl.dot(delta_desc.load([m_begin, off_n]).T, x_desc.load([m_begin, off_k]), input_precision=INPUT_PRECISION)
    for m0 in range(m_begin + BLOCK_M, m_end, BLOCK_M):
        acc = tl.dot(delta_desc.load([m0, off_n]).T, x_desc.load([m0, off_k]), acc, input_precision=INPUT_PRECISION)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    offs_k = off_k + tl.arange(0, BLOCK_K)
    out = grad_w_ptr + pid_s * stride_gws + offs_n[:, None] * stride_gwn + offs_k[None, :] * stride_gwk
    tl.store(out, acc.to(grad_w_ptr.dtype.element_ty), mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])


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

    e is the output error (K = the network's outputs, in B's dtype); B the hidden layers'
    feedback matrices side by side (N = their widths summed), so one GEMM projects e to every
    layer; f' is applied in the epilogue from the saved tensor (y, or f'(z) for gelu), and δ
    stored in its dtype.
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if USE_INT64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    e_ptrs = error_ptr + (offs_m % M)[:, None] * stride_em + offs_k[None, :] * stride_ek
    b_ptrs = feedback_ptr + offs_k[:, None] * stride_bk + (offs_n % N)[None, :] * stride_bn
    e_step = BLOCK_K * stride_ek
    b_step = BLOCK_K * stride_bk
    if USE_INT64:
        e_step = BLOCK_K * tl.cast(stride_ek, tl.int64)
        b_step = BLOCK_K * tl.cast(stride_bk, tl.int64)
    acc = tl.dot(tl.load(e_ptrs, mask=offs_k[None, :] < K, other=0.0),
                 tl.load(b_ptrs, mask=offs_k[:, None] < K, other=0.0), input_precision=INPUT_PRECISION)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        e_ptrs += e_step
        b_ptrs += b_step
        e = tl.load(e_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k0, other=0.0)
        acc = tl.dot(e, b, acc, input_precision=INPUT_PRECISION)
    mask = mask_m[:, None] & mask_n[None, :]
    if ACTIVATION != "identity":
        s = tl.load(saved_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn, mask=mask, other=0.0)
        acc = activation_backward(released(acc), s.to(tl.float32), ACTIVATION, negative_slope)
    out = delta_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn
    tl.store(out, acc.to(delta_ptr.dtype.element_ty), mask=mask)
