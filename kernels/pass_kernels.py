"""The memory-pass kernels of the feedback-alignment linear layer: each reads and writes its
tensors once, and feeds the GEMMs of ``linear_kernels.py`` plain operands.

- :func:`local_error_kernel` — δ = g ⊙ f'(z) and grad_b = Σ_rows δ in one pass over g (and y,
  or the forward's extra tensor). δ is stored in the operand dtype for both backward GEMMs;
  grad_b is summed from δ in fp32 before that rounding, deterministically: each program sums
  its own rows in a fixed order, and split_sum_kernel adds the programs' partials in order.
- :func:`feedback_kernel` — B [N, K] of the methods that form it from W's sign (usf, frsf, brsf),
  into a buffer that lives only for one backward: no B is kept between steps.
- :func:`split_sum_kernel` — Σ_s partial[s] in slice order (split reductions).

Both passes take a model axis as the GEMMs do (``linear_kernels.py``: stacked launches,
program_id(2), ``stride_*e`` between models). Argument order as there: pointers, sizes, strides,
scalars, flags, blocks.
"""

import triton
import triton.language as tl

from .jit_helpers import activation_backward, feedback_tile, model_offset


@triton.jit
def local_error_kernel(
    # pointers
    grad_y_ptr, saved_ptr, delta_ptr, bias_out_ptr,
    # sizes
    M, N, rows_per_split,
    # strides (stride_*e: between the models of a stacked launch)
    stride_ge, stride_gm, stride_gn,
    stride_se, stride_sm, stride_sn,
    stride_de, stride_dm, stride_dn,
    stride_oe,
    # scalars
    negative_slope,
    # flags
    ACTIVATION: tl.constexpr, STORE_DELTA: tl.constexpr, BIAS_GRAD: tl.constexpr, USE_INT64: tl.constexpr,
    STACKED: tl.constexpr,
    # blocks
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """δ[M, N] = g ⊙ f'(saved) (stored when STORE_DELTA, in delta's dtype) and, when BIAS_GRAD,
    the column sums of δ into bias_out.

    Program (column block, s), s = program_id(1), walks rows [s·rows_per_split, …) of its
    columns. bias_out is [splits, N] (row s = this slice's sums, contiguous): fp32 partials for
    split_sum_kernel, or grad_b itself (its dtype) when there is one slice; stride_oe apart
    between the models of a stacked launch (which has one slice).
    """
    grad_y_ptr += model_offset(stride_ge, STACKED, USE_INT64)
    saved_ptr += model_offset(stride_se, STACKED, USE_INT64)
    delta_ptr += model_offset(stride_de, STACKED, USE_INT64)
    bias_out_ptr += model_offset(stride_oe, STACKED, USE_INT64)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if USE_INT64:
        offs_n = offs_n.to(tl.int64)
    mask_n = offs_n < N
    m_begin = pid_s * rows_per_split
    m_end = tl.minimum(M, m_begin + rows_per_split)
    column_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        if USE_INT64:
            offs_m = offs_m.to(tl.int64)
        mask = (offs_m < m_end)[:, None] & mask_n[None, :]
        g = tl.load(grad_y_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=mask, other=0.0)
        s = g
        if ACTIVATION != "identity":
            s = tl.load(saved_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn, mask=mask, other=0.0)
        delta = activation_backward(g.to(tl.float32), s.to(tl.float32), ACTIVATION, negative_slope)
        if STORE_DELTA:
            out = delta_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn
            tl.store(out, delta.to(delta_ptr.dtype.element_ty), mask=mask)
        if BIAS_GRAD:
            column_sum += tl.sum(delta, axis=0)
    if BIAS_GRAD:
        tl.store(bias_out_ptr + pid_s * N + offs_n, column_sum.to(bias_out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def feedback_kernel(
    # pointers
    weight_ptr, feedback_ptr, counter_ptr, out_ptr,
    # sizes
    N, K,
    # strides (stride_*e: between the models of a stacked launch)
    stride_we, stride_wn, stride_wk,
    stride_fe, stride_fn, stride_fk,
    stride_oe,
    # scalars
    scale, seed,
    # flags
    METHOD: tl.constexpr, USE_INT64: tl.constexpr, STACKED: tl.constexpr,
    # blocks
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[N, K] (rows contiguous, W's dtype) = B as the sign method METHOD forms it
    (jit_helpers.feedback_tile): scale·sign(W) ("usf"), |R|·sign(W) with R = feedback ("frsf"),
    or with |R| drawn by Philox from (seed, the draw number at counter_ptr) ("brsf"). In a
    stacked launch every model draws the same R (one seed and counter), as its own launch would."""
    weight_ptr += model_offset(stride_we, STACKED, USE_INT64)
    feedback_ptr += model_offset(stride_fe, STACKED, USE_INT64)
    out_ptr += model_offset(stride_oe, STACKED, USE_INT64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    if USE_INT64:
        offs_n = offs_n.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    draw_offset = 0
    if METHOD == "brsf":
        draw_offset = tl.load(counter_ptr) * N * K
    element = offs_n[:, None].to(tl.int64) * K + offs_k[None, :].to(tl.int64)  # brsf's draw offsets: n·K + k
    b = feedback_tile(feedback_ptr + offs_n[:, None] * stride_fn + offs_k[None, :] * stride_fk,
                      weight_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                      mask, element, draw_offset, seed, scale, METHOD)
    tl.store(out_ptr + element, b, mask=mask)


@triton.jit
def split_sum_kernel(
    # pointers
    partial_ptr, out_ptr,
    # sizes
    numel, splits,
    # blocks
    BLOCK: tl.constexpr,
):
    """out[i] = Σ_s partial[s, i] for i < numel, s = 0, 1, … in order (fp32; partial [splits,
    numel] and out contiguous; out in its own dtype)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(partial_ptr + s * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
