"""The fused narrow MLP: the forward of a chain of 2 to 4 linear layers in one kernel, and its
backward's δ chain in another.

Shapes (nn.Linear's layout; M rows of the flattened batch)::

    h_0 = x [M, K],  h_l = y_l = f_l(h_{l-1} W_lᵀ + b_l) [M, N_l],  W_l [N_l, N_{l-1}] (N_0 = K)

Each program takes BLOCK_M rows through every layer. The first layer is a tutorial GEMM main
loop over K (both operands from memory into the dot, the first step peeled as in
``linear_kernels.py``); every later layer is narrow (N_l ≤ 128, one BLOCK_N_l ≥ 16 block), so
its input is the row block already on chip and its whole Wᵀ one dot operand read from L2. Each
y_l is stored (backward reads it: layer l+1's input, and f'_l read off it), rounded to the
storage dtype, and that rounded tile is the next layer's input: the numbers of the per-layer
kernels, without reading y_l back or launching once per layer. Bias and activation are the
epilogue of each dot, on the fp32 accumulator. No atomics; a fixed order.

The backward (``mlp_backward_kernel``) walks the δ chain on each row block the same way: δ_L
from g, then δ_{l-1} = (δ_l B_l) ⊙ f'_{l-1}(y_{l-1}) with B_l one dot operand and f' on the
accumulator (the chain step of ``dfa_delta_kernel``, without its launches), each δ_l stored with
its grad_b partial sums, and grad_x = δ_1 B_1 last.

Argument order as in the tutorials: pointers, sizes, strides, scalars, constexpr flags, blocks.
Layers past ``LAYERS`` take dummy pointers and are compiled out.
"""

import triton
import triton.language as tl

from .jit_helpers import activation_backward, apply_activation


@triton.jit
def _dot_on_chip(a, matrix_ptr, rows, cols, stride_r, stride_c, INPUT_PRECISION: tl.constexpr,
                 USE_INT64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """a [BLOCK_M, BLOCK_R] (on chip, zero past ``rows``) @ the whole matrix [rows, cols] read
    through (stride_r, stride_c) as one dot operand, zero past its edges -> fp32 [BLOCK_M, BLOCK_C]."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    if USE_INT64:
        offs_r = offs_r.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
    operand = tl.load(matrix_ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c,
                      mask=(offs_r < rows)[:, None] & (offs_c < cols)[None, :], other=0.0)
    return tl.dot(a, operand, input_precision=INPUT_PRECISION)


@triton.jit
def _narrow_layer(h, w_ptr, b_ptr, y_ptr, offs_m, mask_m, K_l, N_l, stride_wn, stride_wk, stride_ym, negative_slope,
                  HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                  USE_INT64: tl.constexpr, BLOCK_K_L: tl.constexpr, BLOCK_N_L: tl.constexpr):
    """y = f(h Wᵀ + b) of one narrow layer on a row block on chip: h [BLOCK_M, BLOCK_K_L]
    (storage dtype, zero past K_l) -> y stored, and returned in the storage dtype (zero past N_l)."""
    # Wᵀ [K_l, N_l] read straight from W's [N_l, K_l] layout.
    acc = _dot_on_chip(h, w_ptr, K_l, N_l, stride_wk, stride_wn, INPUT_PRECISION, USE_INT64, BLOCK_K_L, BLOCK_N_L)
    offs_n = tl.arange(0, BLOCK_N_L)
    if USE_INT64:
        offs_n = offs_n.to(tl.int64)
    return _store_layer(acc, b_ptr, y_ptr, offs_m, mask_m, offs_n, offs_n < N_l, stride_ym, negative_slope, HAS_BIAS,
                        ACTIVATION)


@triton.jit
def _store_layer(acc, b_ptr, y_ptr, offs_m, mask_m, offs_n, mask_n, stride_ym, negative_slope,
                 HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):
    """The epilogue of one layer: bias and activation on the fp32 accumulator, y stored (masked)
    and returned in the storage dtype with the columns past N_l zeroed (the next layer's input)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = apply_activation(acc, ACTIVATION, negative_slope)
    y = tl.where(mask_n[None, :], y, 0.0).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y, mask=mask_m[:, None] & mask_n[None, :])
    return y


@triton.jit
def mlp_forward_kernel(
    # pointers (layer l: weight, bias, y; unused layers get layer 1's)
    x_ptr,
    w1_ptr, b1_ptr, y1_ptr, w2_ptr, b2_ptr, y2_ptr, w3_ptr, b3_ptr, y3_ptr, w4_ptr, b4_ptr, y4_ptr,
    # sizes
    M, K, N1, N2, N3, N4,
    # strides (each y_l is contiguous: its row stride is N_l)
    stride_xm, stride_xk,
    stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_w3n, stride_w3k, stride_w4n, stride_w4k,
    # scalars
    slope1, slope2, slope3, slope4,
    # flags
    LAYERS: tl.constexpr,
    HAS_BIAS1: tl.constexpr, HAS_BIAS2: tl.constexpr, HAS_BIAS3: tl.constexpr, HAS_BIAS4: tl.constexpr,
    ACTIVATION1: tl.constexpr, ACTIVATION2: tl.constexpr, ACTIVATION3: tl.constexpr, ACTIVATION4: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, USE_INT64: tl.constexpr,
    # blocks
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_N3: tl.constexpr, BLOCK_N4: tl.constexpr,
):
    """y_l [M, N_l] for l = 1 … LAYERS (2 to 4) of the chain x [M, K] -> N1 -> … (module docstring)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N1)
    if USE_INT64:
        offs_m = offs_m.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N1

    # Layer 1, the tutorial's main loop over K: rows past the edge wrap around (the stores are
    # masked), W's rows past N1 are masked to zero, only K is masked in the loop.
    x_ptrs = x_ptr + (offs_m % M)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    wt_ptrs = w1_ptr + offs_k[:, None] * stride_w1k + offs_n[None, :] * stride_w1n
    x_step = BLOCK_K * stride_xk
    wt_step = BLOCK_K * stride_w1k
    if USE_INT64:
        x_step = BLOCK_K * tl.cast(stride_xk, tl.int64)
        wt_step = BLOCK_K * tl.cast(stride_w1k, tl.int64)
    acc = tl.dot(tl.load(x_ptrs, mask=offs_k[None, :] < K, other=0.0),
                 tl.load(wt_ptrs, mask=(offs_k[:, None] < K) & mask_n[None, :], other=0.0),
                 input_precision=INPUT_PRECISION)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        x_ptrs += x_step
        wt_ptrs += wt_step
        x = tl.load(x_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
        wt = tl.load(wt_ptrs, mask=(offs_k[:, None] < K - k0) & mask_n[None, :], other=0.0)
        acc = tl.dot(x, wt, acc, input_precision=INPUT_PRECISION)
    h = _store_layer(acc, b1_ptr, y1_ptr, offs_m, mask_m, offs_n, mask_n, N1, slope1, HAS_BIAS1, ACTIVATION1)

    # The narrow layers, on the row block on chip.
    h = _narrow_layer(h, w2_ptr, b2_ptr, y2_ptr, offs_m, mask_m, N1, N2, stride_w2n, stride_w2k, N2, slope2,
                      HAS_BIAS2, ACTIVATION2, INPUT_PRECISION, USE_INT64, BLOCK_N1, BLOCK_N2)
    if LAYERS >= 3:
        h3 = _narrow_layer(h, w3_ptr, b3_ptr, y3_ptr, offs_m, mask_m, N2, N3, stride_w3n, stride_w3k, N3, slope3,
                           HAS_BIAS3, ACTIVATION3, INPUT_PRECISION, USE_INT64, BLOCK_N2, BLOCK_N3)
        if LAYERS >= 4:
            _narrow_layer(h3, w4_ptr, b4_ptr, y4_ptr, offs_m, mask_m, N3, N4, stride_w4n, stride_w4k, N4, slope4,
                          HAS_BIAS4, ACTIVATION4, INPUT_PRECISION, USE_INT64, BLOCK_N3, BLOCK_N4)


# ---------------------------------------------------------------------------------- backward

@triton.jit
def _top_delta(grad_ptr, y_ptr, offs_m, mask_m, N_l, stride_gm, stride_gn, negative_slope,
               ACTIVATION: tl.constexpr, USE_INT64: tl.constexpr, BLOCK_N_L: tl.constexpr):
    """δ_L = g ⊙ f'_L(y_L) of the top layer on a row block (fp32, zero past N_L)."""
    offs_n = tl.arange(0, BLOCK_N_L)
    if USE_INT64:
        offs_n = offs_n.to(tl.int64)
    mask = mask_m[:, None] & (offs_n < N_l)[None, :]
    g = tl.load(grad_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=mask, other=0.0)
    if ACTIVATION == "identity":
        delta = g.to(tl.float32)
    else:
        s = tl.load(y_ptr + offs_m[:, None] * N_l + offs_n[None, :], mask=mask, other=0.0)
        delta = activation_backward(g.to(tl.float32), s.to(tl.float32), ACTIVATION, negative_slope)
    return tl.where(mask, delta, 0.0)


@triton.jit
def _emit_delta(delta, delta_ptr, partial_ptr, offs_m, mask_m, N_l, column, partial_cols,
                BIAS_GRAD: tl.constexpr, BLOCK_N_L: tl.constexpr):
    """Store δ_l [BLOCK_M, BLOCK_N_L] (rounded to its dtype, the operand of the layer's weight
    GEMM and of the step below) and, for grad_b, this row block's fp32 column sums into
    partial[program, column + n]; return the rounded δ_l."""
    offs_n = tl.arange(0, BLOCK_N_L)
    mask_n = offs_n < N_l
    rounded = delta.to(delta_ptr.dtype.element_ty)
    tl.store(delta_ptr + offs_m[:, None] * N_l + offs_n[None, :], rounded, mask=mask_m[:, None] & mask_n[None, :])
    if BIAS_GRAD:
        tl.store(partial_ptr + tl.program_id(0) * partial_cols + column + offs_n, tl.sum(delta, axis=0), mask=mask_n)
    return rounded


@triton.jit
def _step_down(delta, feedback_ptr, y_ptr, offs_m, mask_m, N_l, N_below, stride_bn, stride_bk, negative_slope,
               ACTIVATION: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_INT64: tl.constexpr,
               BLOCK_N_L: tl.constexpr, BLOCK_N_BELOW: tl.constexpr):
    """δ_{l-1} = (δ_l B_l) ⊙ f'_{l-1}(y_{l-1}) on a row block: δ_l [BLOCK_M, BLOCK_N_L] on chip
    (rounded), B_l [N_l, N_below] one dot operand; fp32, zero past N_below."""
    acc = _dot_on_chip(delta, feedback_ptr, N_l, N_below, stride_bn, stride_bk, INPUT_PRECISION, USE_INT64,
                       BLOCK_N_L, BLOCK_N_BELOW)
    offs_b = tl.arange(0, BLOCK_N_BELOW)
    if USE_INT64:
        offs_b = offs_b.to(tl.int64)
    mask_b = offs_b < N_below
    mask = mask_m[:, None] & mask_b[None, :]
    if ACTIVATION != "identity":
        s = tl.load(y_ptr + offs_m[:, None] * N_below + offs_b[None, :], mask=mask, other=0.0)
        acc = activation_backward(acc, s.to(tl.float32), ACTIVATION, negative_slope)
    return tl.where(mask, acc, 0.0)


@triton.jit
def mlp_backward_kernel(
    # pointers (layer l: its saved y, its B, its δ; unused layers get layer 1's)
    grad_ptr, y1_ptr, y2_ptr, y3_ptr, y4_ptr, fb1_ptr, fb2_ptr, fb3_ptr, fb4_ptr,
    d1_ptr, d2_ptr, d3_ptr, d4_ptr, partial_ptr, grad_x_ptr,
    # sizes (column: where layer l's grad_b partials start in a row of partial)
    M, K, N1, N2, N3, N4, partial_cols, column1, column2, column3, column4,
    # strides (each y_l and δ_l is contiguous: its row stride is N_l)
    stride_gm, stride_gn,
    stride_b1n, stride_b1k, stride_b2n, stride_b2k, stride_b3n, stride_b3k, stride_b4n, stride_b4k,
    stride_xm, stride_xk,
    # scalars
    slope1, slope2, slope3, slope4,
    # flags
    LAYERS: tl.constexpr,
    ACTIVATION1: tl.constexpr, ACTIVATION2: tl.constexpr, ACTIVATION3: tl.constexpr, ACTIVATION4: tl.constexpr,
    BIAS1: tl.constexpr, BIAS2: tl.constexpr, BIAS3: tl.constexpr, BIAS4: tl.constexpr,
    NEED_GRAD_X: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_INT64: tl.constexpr,
    # blocks
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_N3: tl.constexpr, BLOCK_N4: tl.constexpr,
):
    """The δ chain of a narrow MLP on one row block, top to bottom: δ_L = g ⊙ f'_L(y_L), then
    δ_{l-1} = (δ_l B_l) ⊙ f'_{l-1}(y_{l-1}), each δ_l stored with its grad_b partial sums, and
    grad_x = δ_1 B_1 (B_1 [N1, K], K in BLOCK_K steps) when NEED_GRAD_X. The weight gradients
    δ_lᵀ h_{l-1} are GEMMs over the batch, launched after it (the backend's ``chain_backward``)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if USE_INT64:
        offs_m = offs_m.to(tl.int64)
    mask_m = offs_m < M
    if LAYERS == 4:
        d = _top_delta(grad_ptr, y4_ptr, offs_m, mask_m, N4, stride_gm, stride_gn, slope4, ACTIVATION4, USE_INT64,
                       BLOCK_N4)
        d = _emit_delta(d, d4_ptr, partial_ptr, offs_m, mask_m, N4, column4, partial_cols, BIAS4, BLOCK_N4)
        d = _step_down(d, fb4_ptr, y3_ptr, offs_m, mask_m, N4, N3, stride_b4n, stride_b4k, slope3, ACTIVATION3,
                       INPUT_PRECISION, USE_INT64, BLOCK_N4, BLOCK_N3)
        d = _emit_delta(d, d3_ptr, partial_ptr, offs_m, mask_m, N3, column3, partial_cols, BIAS3, BLOCK_N3)
        d = _step_down(d, fb3_ptr, y2_ptr, offs_m, mask_m, N3, N2, stride_b3n, stride_b3k, slope2, ACTIVATION2,
                       INPUT_PRECISION, USE_INT64, BLOCK_N3, BLOCK_N2)
    elif LAYERS == 3:
        d = _top_delta(grad_ptr, y3_ptr, offs_m, mask_m, N3, stride_gm, stride_gn, slope3, ACTIVATION3, USE_INT64,
                       BLOCK_N3)
        d = _emit_delta(d, d3_ptr, partial_ptr, offs_m, mask_m, N3, column3, partial_cols, BIAS3, BLOCK_N3)
        d = _step_down(d, fb3_ptr, y2_ptr, offs_m, mask_m, N3, N2, stride_b3n, stride_b3k, slope2, ACTIVATION2,
                       INPUT_PRECISION, USE_INT64, BLOCK_N3, BLOCK_N2)
    else:
        d = _top_delta(grad_ptr, y2_ptr, offs_m, mask_m, N2, stride_gm, stride_gn, slope2, ACTIVATION2, USE_INT64,
                       BLOCK_N2)
    d = _emit_delta(d, d2_ptr, partial_ptr, offs_m, mask_m, N2, column2, partial_cols, BIAS2, BLOCK_N2)
    d = _step_down(d, fb2_ptr, y1_ptr, offs_m, mask_m, N2, N1, stride_b2n, stride_b2k, slope1, ACTIVATION1,
                   INPUT_PRECISION, USE_INT64, BLOCK_N2, BLOCK_N1)
    d = _emit_delta(d, d1_ptr, partial_ptr, offs_m, mask_m, N1, column1, partial_cols, BIAS1, BLOCK_N1)
    if NEED_GRAD_X:
        offs_n = tl.arange(0, BLOCK_N1)
        offs_k = tl.arange(0, BLOCK_K)
        if USE_INT64:
            offs_n = offs_n.to(tl.int64)
            offs_k = offs_k.to(tl.int64)
        for k0 in range(0, K, BLOCK_K):
            feedback = tl.load(fb1_ptr + offs_n[:, None] * stride_b1n + (k0 + offs_k)[None, :] * stride_b1k,
                               mask=(offs_n < N1)[:, None] & (k0 + offs_k < K)[None, :], other=0.0)
            grad_x = tl.dot(d, feedback, input_precision=INPUT_PRECISION)
            tl.store(grad_x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                     grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask_m[:, None] & (k0 + offs_k < K)[None, :])


@triton.jit
def _weight_tile(d_ptr, h_ptr, g_ptr, M, N, K, stride_hm, stride_hk, tile, INPUT_PRECISION: tl.constexpr,
                 USE_INT64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """One BLOCK_N × BLOCK_K tile of grad_W = δᵀ h (δ [M, N] contiguous, h [M, K], grad_W [N, K]
    contiguous), reduced over the batch as the tutorial's main loop (first step peeled, nothing
    else in the loop). Called with a layer's own kernel arguments, so that the compiler keeps
    what it knows of their alignment (a pointer chosen at run time loses it: plain loads, not
    asynchronous copies)."""
    tiles_k = tl.cdiv(K, BLOCK_K)
    offs_n = (tile // tiles_k) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = (tile % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    if USE_INT64:
        offs_n = offs_n.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
        offs_m = offs_m.to(tl.int64)
    # δᵀ [BLOCK_N, BLOCK_M] read through δ's [M, N] layout; columns past the edges wrap (the
    # store is masked), only the batch is masked in the loop.
    dt_ptrs = d_ptr + (offs_n % N)[:, None] + offs_m[None, :] * N
    h_ptrs = h_ptr + offs_m[:, None] * stride_hm + (offs_k % K)[None, :] * stride_hk
    dt_step = BLOCK_M * N
    h_step = BLOCK_M * stride_hm
    if USE_INT64:
        dt_step = BLOCK_M * tl.cast(N, tl.int64)
        h_step = BLOCK_M * tl.cast(stride_hm, tl.int64)
    acc = tl.dot(tl.load(dt_ptrs, mask=offs_m[None, :] < M, other=0.0),
                 tl.load(h_ptrs, mask=offs_m[:, None] < M, other=0.0), input_precision=INPUT_PRECISION)
    for m0 in range(BLOCK_M, M, BLOCK_M):
        dt_ptrs += dt_step
        h_ptrs += h_step
        dt = tl.load(dt_ptrs, mask=offs_m[None, :] < M - m0, other=0.0)
        h = tl.load(h_ptrs, mask=offs_m[:, None] < M - m0, other=0.0)
        acc = tl.dot(dt, h, acc, input_precision=INPUT_PRECISION)
    tl.store(g_ptr + offs_n[:, None] * K + offs_k[None, :], acc.to(g_ptr.dtype.element_ty),
             mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])


@triton.jit
def mlp_weight_grad_kernel(
    # pointers (layer l: δ_l [M, N_l] contiguous, h_{l-1} [M, K_l], grad_W_l [N_l, K_l] contiguous)
    d1_ptr, h1_ptr, g1_ptr, d2_ptr, h2_ptr, g2_ptr, d3_ptr, h3_ptr, g3_ptr, d4_ptr, h4_ptr, g4_ptr,
    # sizes (end_l: the programs of layers 1 … l; the grid is end_LAYERS)
    M, N1, K1, N2, K2, N3, K3, N4, K4, end1, end2, end3,
    # strides
    stride_h1m, stride_h1k, stride_h2m, stride_h2k, stride_h3m, stride_h3k, stride_h4m, stride_h4k,
    # flags
    LAYERS: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_INT64: tl.constexpr,
    # blocks
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Every layer's grad_W_l = δ_lᵀ h_{l-1} from one grouped launch: program p takes one
    BLOCK_N × BLOCK_K tile of the layer whose programs hold p (``_weight_tile``)."""
    pid = tl.program_id(0)
    if pid < end1:
        _weight_tile(d1_ptr, h1_ptr, g1_ptr, M, N1, K1, stride_h1m, stride_h1k, pid, INPUT_PRECISION, USE_INT64,
                     BLOCK_N, BLOCK_K, BLOCK_M)
    elif LAYERS == 2:
        _weight_tile(d2_ptr, h2_ptr, g2_ptr, M, N2, K2, stride_h2m, stride_h2k, pid - end1, INPUT_PRECISION,
                     USE_INT64, BLOCK_N, BLOCK_K, BLOCK_M)
    elif pid < end2:
        _weight_tile(d2_ptr, h2_ptr, g2_ptr, M, N2, K2, stride_h2m, stride_h2k, pid - end1, INPUT_PRECISION,
                     USE_INT64, BLOCK_N, BLOCK_K, BLOCK_M)
    elif LAYERS == 3:
        _weight_tile(d3_ptr, h3_ptr, g3_ptr, M, N3, K3, stride_h3m, stride_h3k, pid - end2, INPUT_PRECISION,
                     USE_INT64, BLOCK_N, BLOCK_K, BLOCK_M)
    elif pid < end3:
        _weight_tile(d3_ptr, h3_ptr, g3_ptr, M, N3, K3, stride_h3m, stride_h3k, pid - end2, INPUT_PRECISION,
                     USE_INT64, BLOCK_N, BLOCK_K, BLOCK_M)
    else:
        _weight_tile(d4_ptr, h4_ptr, g4_ptr, M, N4, K4, stride_h4m, stride_h4k, pid - end3, INPUT_PRECISION,
                     USE_INT64, BLOCK_N, BLOCK_K, BLOCK_M)
