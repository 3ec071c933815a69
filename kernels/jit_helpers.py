"""``@triton.jit`` helpers shared by fa_triton's kernels (and by later kernels that import them).

- :func:`apply_activation` — y = f(z), on an fp32 tile.
- :func:`activation_and_extra` — y and what the forward stores besides y where f' cannot be
  read off y: z (leaky_relu with a negative slope) or f'(z) (gelu); ``fa_triton.activations.saves_extra``.
- :func:`activation_backward` — δ = g ⊙ f'(z) from g and the saved tensor (y or that extra);
  :func:`local_error` applies it to tiles as loaded.
- :func:`released` — an accumulator as new values for an epilogue (keeps ptxas from
  serializing the main loop).
- :func:`grouped_tile` — tutorial-03 grouped ordering of output tiles.
- :func:`model_offset` — where this program's model starts in a stacked launch.

Every formula here is the one of ``fa_triton/activations.py`` (the PyTorch reference), special
values included: NaN propagates as in ``torch.relu`` and its backward.
"""

import triton
import triton.language as tl

# constexpr: @triton.jit code may read only constexpr globals (the interpreter is laxer).
INV_SQRT2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def apply_activation(z, ACTIVATION: tl.constexpr, negative_slope):
    """y = f(z) for one of ``fa_triton.ACTIVATIONS`` (erf-form gelu)."""
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
        y = 0.5 * z * (1.0 + tl.math.erf(z * INV_SQRT2))
    else:
        y = z
    return y


@triton.jit
def activation_and_extra(z, ACTIVATION: tl.constexpr, negative_slope):
    """(y = f(z), the extra tensor for backward): f'(z) for gelu (Φ(z) + z φ(z), sharing Φ with
    y and computed once here instead of in every backward program), else z."""
    if ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(z * INV_SQRT2))
        y = z * cdf
        extra = cdf + z * tl.exp(-0.5 * z * z) * INV_SQRT_2PI
    else:
        y = apply_activation(z, ACTIVATION, negative_slope)
        extra = z
    return y, extra


@triton.jit
def activation_backward(grad_y, saved, ACTIVATION: tl.constexpr, negative_slope):
    """δ = g ⊙ f'(z); ``saved`` is y, z for leaky_relu with a negative slope, f'(z) for gelu."""
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
        delta = grad_y * saved
    else:
        delta = grad_y
    return delta


@triton.jit
def local_error(grad_y, saved, ACTIVATION: tl.constexpr, negative_slope):
    """δ = g ⊙ f'(z) from g and saved tiles as loaded (storage dtype). relu and identity select
    in the storage dtype (the same values, half the registers of fp32 for 16-bit tiles); the
    others compute in fp32 and return fp32."""
    if ACTIVATION == "relu":
        delta = tl.where(saved <= 0, tl.zeros_like(grad_y), grad_y)
    elif ACTIVATION == "identity":
        delta = grad_y
    else:
        delta = activation_backward(grad_y.to(tl.float32), saved.to(tl.float32), ACTIVATION, negative_slope)
    return delta


@triton.jit
def feedback_tile(feedback_ptrs, weight_ptrs, mask, offs_element, draw_offset, seed, scale, METHOD: tl.constexpr):
    """A tile of B as the sign method ``METHOD`` forms it from W (``fa_triton.rules.methods``):

    - "usf": scale·sign(W), W loaded from ``weight_ptrs``;
    - "frsf": |R|·sign(W), R loaded from ``feedback_ptrs``;
    - "brsf": |R|·sign(W) with |R| = scale·U(0, 1) drawn by Philox under ``seed`` at offsets
      ``draw_offset`` (counter·N·K, int64) + ``offs_element`` (int64 n·K + k).

    The magnitude is fp32, the product with W's sign exact, the result rounded once to W's dtype.
    """
    w = tl.load(weight_ptrs, mask=mask, other=0.0)
    sign = tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0))
    if METHOD == "usf":
        magnitude = scale
    elif METHOD == "frsf":
        magnitude = tl.abs(tl.load(feedback_ptrs, mask=mask, other=0.0).to(tl.float32))
    else:
        magnitude = scale * tl.rand(seed, draw_offset + offs_element)
    return (magnitude * sign).to(w.dtype)


@triton.jit
def released(acc):
    """``acc + 0``: the accumulator as new values for an epilogue. A select straight on a wgmma
    accumulator (relu, leaky_relu) makes ptxas 12.8, Triton 3.6's, serialize the main loop's wgmma
    chain (its warning C7515); an add is a new definition. (Only -0.0 changes, to +0.0.)"""
    return acc + 0.0


@triton.jit
def grouped_tile(pid, num_rows, num_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                 GROUP_ROWS: tl.constexpr):
    """(row tile, column tile) of program ``pid``, GROUP_ROWS row tiles at a time (Triton
    tutorial 03): neighbouring programs share operand tiles, which then come from L2."""
    # At least one tile per axis: an empty axis (in_features = 0) still has the programs that
    # write grad_b, and no division by zero below.
    num_pid_rows = tl.maximum(tl.cdiv(num_rows, BLOCK_ROWS), 1)
    num_pid_cols = tl.maximum(tl.cdiv(num_cols, BLOCK_COLS), 1)
    num_pid_in_group = GROUP_ROWS * num_pid_cols
    group_id = pid // num_pid_in_group
    first_pid_row = group_id * GROUP_ROWS
    group_size = min(num_pid_rows - first_pid_row, GROUP_ROWS)
    pid_row = first_pid_row + ((pid % num_pid_in_group) % group_size)
    pid_col = (pid % num_pid_in_group) // group_size
    return pid_row, pid_col


@triton.jit
def model_offset(stride, STACKED: tl.constexpr, USE_INT64: tl.constexpr):
    """The element offset of this program's model in a stacked launch (E models' layers in one
    grid: model e = program_id(2), ``stride`` apart); 0 for a single model's launch. A constexpr
    flag, not stride 0, so that a single model's kernel carries no model offset at all (three
    64-bit offsets cost registers: ptxas spilled a tight fp32 backward-input tile without it)."""
    offset = 0
    if STACKED:
        model = tl.program_id(2)
        if USE_INT64:
            model = model.to(tl.int64)
        offset = model * stride
    return offset
