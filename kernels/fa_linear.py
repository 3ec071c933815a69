"""Launchers of the feedback-alignment linear kernels (``fa_linear_kernels.py``).

Shapes (nn.Linear's layout)::

    fa_linear_forward:          x [M, K], weight [N, K], bias [N]        -> y [M, N] (and the extra)
    fa_linear_backward_input:   grad_y, saved [M, N], feedback [N, K]    -> grad_x [M, K] (and δ)
    fa_linear_backward_weight:  grad_y, saved [M, N], x [M, K]           -> grad_W [N, K], grad_b [N]

A call is one dictionary lookup of a cached launch plan plus Triton's own launch. The plan is
keyed by what decides it — device, dtype, sizes, strides, flags, and for fp32 the tf32 switch —
and holds the config (``tuning.select_config``), the grid, the int64 decision, the dot
precision and the kernel variant (pointer or tensor-descriptor). Any input strides work; Wᵀ is
read through strides and nothing is transposed or copied.
"""

from __future__ import annotations

import contextlib

import torch
import triton

from . import fa_linear_kernels as jit
from . import tuning
from .tuning import LaunchConfig, as_config

__all__ = [
    "INTERPRETED",
    "LaunchConfig",
    "fa_linear_forward",
    "fa_linear_backward_input",
    "fa_linear_backward_weight",
    "clear_plans",
]

_INT32_MAX = 2**31 - 1
# @triton.jit picks the interpreter when the module is imported with TRITON_INTERPRET=1.
INTERPRETED = type(jit.forward_kernel).__name__ == "InterpretedFunction"

try:  # host-side tensor descriptors (Triton >= 3.4); without them only the pointer kernels run
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installation
    TensorDescriptor = None

# Launch plans by key; cleared when it grows past _MAX_PLANS (a key per batch size and layout).
_PLANS: dict[tuple, object] = {}
_MAX_PLANS = 4096


def clear_plans() -> None:
    """Forget every cached launch plan (tuned configs are kept in ``tuning.TUNED``)."""
    _PLANS.clear()


_fp32_precision_getter = getattr(torch._C, "_get_fp32_precision_getter", None)


def fp32_matmul_allows_tf32() -> bool:
    """Whether PyTorch lets fp32 CUDA matmuls use tf32.

    Since torch 2.9 reading ``allow_tf32`` raises once the newer ``fp32_precision`` switch
    has been set, so that switch is read where it exists (setting ``allow_tf32`` updates it),
    through the C getter behind ``torch.backends.cuda.matmul.fp32_precision`` (a tenth of the
    attribute's cost: this runs at every fp32 launch).
    """
    if _fp32_precision_getter is not None:
        return _fp32_precision_getter("cuda", "matmul") == "tf32"
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 dots follow PyTorch's own switch (ieee unless the user allowed tf32); for half
    # types the setting has no effect and "tf32" is Triton's default.
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


def _tma_layout(*tensors: torch.Tensor) -> bool:
    """Whether tensor descriptors can address these 2-D tensors: unit last stride and 16-byte
    aligned row strides (the base pointers' alignment is checked at each call)."""
    if TensorDescriptor is None:
        return False
    for t in tensors:
        if t is None:
            continue
        stride_rows, stride_cols = t.stride()
        if stride_cols != 1 or (stride_rows * t.element_size()) % 16 or stride_rows < t.shape[1] or t.numel() == 0:
            return False
    return True


def _aligned(*tensors: torch.Tensor) -> bool:
    for t in tensors:
        if t is not None and t.data_ptr() % 16:
            return False
    return True


def _descriptor(t: torch.Tensor, block_rows: int, block_cols: int):
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [block_rows, block_cols])


def _device_index(t: torch.Tensor) -> int | None:
    return t.device.index if t.is_cuda else None


def _on_device(device_index: int | None, run, *args) -> None:
    # Triton launches on the *current* CUDA device, not on the tensors' own.
    if device_index is None or torch.cuda.current_device() == device_index:
        run(*args)
    else:
        with torch.cuda.device(device_index):
            run(*args)


def _remember(key: tuple, plan) -> None:
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = plan


def _plan(key: tuple, build, config, kernel: str, rows: int, cols: int, red: int, batch_axis: str, *,
          dtype: torch.dtype, device: torch.device, precision: str, activation: str, bias_grad: bool, store: bool,
          tma_layout: bool, run_args):
    """The launch plan for ``key``: ``build(config)`` makes a runner; the config is the given one,
    the table's, the tuned one or the heuristic (tuning.select_config). Remembered unless it
    is a stand-in chosen during CUDA-graph capture."""
    if config is not None:
        cfg, final = as_config(config), True
    else:
        runners = {}

        def launch(candidate):
            # Built once per candidate, outside what the tuner times.
            if candidate not in runners:
                runners[candidate] = build(candidate)
            runners[candidate](*run_args)

        # do_bench times (and capture is checked) on the current device: make it the tensors' own.
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            cfg, final = tuning.select_config(
                kernel, rows, cols, red, batch_axis, dtype=dtype, device=device, precision=precision,
                activation=activation, bias_grad=bias_grad, store=store, tma_layout=tma_layout,
                interpreted=INTERPRETED, launch=launch,
            )
    plan = build(cfg)
    plan.config = cfg  # what the plan launches with (bench/sweep.py reports it)
    if final:
        _remember(key, plan)
    return plan


def _check_tma(cfg: LaunchConfig, tma_layout: bool, what: str) -> None:
    if cfg.tma and not tma_layout:
        raise ValueError(
            f"config asks for the tensor-descriptor (TMA) {what} kernel, but the operands' layout does not allow it "
            "(each needs a unit last stride and 16-byte aligned rows); use tma=False"
        )


def _check_out(out: torch.Tensor, shape: tuple, like: torch.Tensor, name: str) -> None:
    if tuple(out.shape) != shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"{name} must be a {like.dtype} tensor of shape {shape} on {like.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )


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
    M, K = x.shape
    N = weight.shape[0]
    if out is None:
        y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    else:
        _check_out(out, (M, N), x, "out")
        y = out
    extra = torch.empty_strided((M, N), y.stride(), device=x.device, dtype=x.dtype) if store_extra else None
    if M == 0:
        return y, extra
    if config is not None:
        config = as_config(config)
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()  # the kernels read bias with a unit stride (an expanded one included)
    precision = _dot_precision(x.dtype)
    key = ("forward", x.device, x.dtype, weight.dtype, M, N, K, x.stride(), weight.stride(), y.stride(), bias is None,
           activation, store_extra, precision, config)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _forward_plan(key, x, weight, bias, y, extra, activation, negative_slope, store_extra, precision,
                             config)
    plan(x, weight, bias, y, extra, negative_slope)
    return y, extra


def _epilogue_halves(activation: str, store_extra: bool, cfg: LaunchConfig) -> bool:
    # gelu's epilogue (erf and exp for y and f'(z)) on a 128x256 tile overflows the register file.
    return activation == "gelu" and store_extra and cfg.block_rows * cfg.block_cols >= 128 * 256


def _forward_plan(key, x, weight, bias, y, extra, activation, negative_slope, store_extra, precision, config):
    M, K = x.shape
    N = weight.shape[0]
    use_int64 = _needs_int64(x, weight, y)
    tma_layout = not use_int64 and _tma_layout(x, weight, y)
    has_bias = bias is not None
    device_index = _device_index(x)
    flags = dict(HAS_BIAS=has_bias, STORE_EXTRA=store_extra, ACTIVATION=activation)
    sizes_strides = (x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1))

    def pointer_runner(cfg: LaunchConfig):
        tiles = triton.cdiv(M, cfg.block_rows) * triton.cdiv(N, cfg.block_cols)
        splits, k_per_split = tuning.split_plan(K, tuning.cap_split(cfg.split, K, M * N, cfg.block_red), cfg.block_red)
        meta = dict(flags, INPUT_PRECISION=precision, USE_INT64=use_int64, SPLIT=splits > 1,
                    EPILOGUE_HALVES=_epilogue_halves(activation, store_extra, cfg), BLOCK_M=cfg.block_rows,
                    BLOCK_N=cfg.block_cols, BLOCK_K=cfg.block_red, GROUP_M=cfg.group,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if splits == 1:
            def run(x, weight, bias, y, extra, slope):
                jit.forward_kernel.run(
                    x, weight, y if bias is None else bias, y, y if extra is None else extra, y,
                    M, N, K, K, *sizes_strides, float(slope), grid=(tiles,), warmup=False, **meta)
            return run

        epilogue_grid = (triton.cdiv(M, 32), triton.cdiv(N, 64))
        epilogue_meta = dict(flags, BLOCK_M=32, BLOCK_N=64, num_warps=4)

        def run_split(x, weight, bias, y, extra, slope):
            partial = torch.empty((splits, M, N), device=x.device, dtype=torch.float32)
            jit.forward_kernel.run(
                x, weight, partial, partial, partial, partial,
                M, N, K, k_per_split, *sizes_strides, float(slope), grid=(tiles, splits), warmup=False, **meta)
            jit.forward_split_epilogue_kernel.run(
                partial, y if bias is None else bias, y, y if extra is None else extra,
                M, N, splits, y.stride(0), y.stride(1), float(slope), grid=epilogue_grid, warmup=False,
                **epilogue_meta)
        return run_split

    def build(cfg: LaunchConfig):
        _check_tma(cfg, tma_layout, "forward")
        if not cfg.tma:
            return _with_device(device_index, pointer_runner(cfg))
        fallback = pointer_runner(cfg.replace(tma=False, split=1))
        grid = (triton.cdiv(M, cfg.block_rows) * triton.cdiv(N, cfg.block_cols),)
        halves = _epilogue_halves(activation, store_extra, cfg)
        meta = dict(flags, INPUT_PRECISION=precision, EPILOGUE_HALVES=halves, BLOCK_M=cfg.block_rows,
                    BLOCK_N=cfg.block_cols, BLOCK_K=cfg.block_red, GROUP_M=cfg.group, num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages)
        bm, bn, bk = cfg.block_rows, cfg.block_cols, cfg.block_red
        bn_out = bn // 2 if halves else bn  # the epilogue's store blocks

        def run_tma(x, weight, bias, y, extra, slope):
            if not _aligned(x, weight, y, extra):
                return fallback(x, weight, bias, y, extra, slope)
            y_desc = _descriptor(y, bm, bn_out)
            jit.forward_tma_kernel.run(
                _descriptor(x, bm, bk), _descriptor(weight, bn, bk), y if bias is None else bias, y_desc,
                y_desc if extra is None else _descriptor(extra, bm, bn_out),
                M, N, K, float(slope), grid=grid, warmup=False, **meta)
        return _with_device(device_index, run_tma)

    return _plan(key, build, config, "forward", M, N, K, "rows", dtype=x.dtype, device=x.device,
                 precision=precision, activation=activation, bias_grad=False, store=store_extra,
                 tma_layout=tma_layout, run_args=(x, weight, bias, y, extra, negative_slope))


def _with_device(device_index: int | None, run):
    if device_index is None:
        return run

    def on_device(*args):
        _on_device(device_index, run, *args)
    return on_device


# ---------------------------------------------------------------------------- backward input

FEEDBACK_MODES = ("matrix", "sign", "magnitude_sign", "random_sign")


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
    feedback_mode: str = "matrix",
    weight: torch.Tensor | None = None,
    feedback_scale: float = 1.0,
    seed: int = 0,
    counter: torch.Tensor | None = None,
) -> torch.Tensor:
    """``grad_x = (g ⊙ f'(z)) B``.

    Args: grad_y [M, N], saved [M, N] (y or the extra tensor, see ``saves_extra``; None
    for identity); B [N, K] as ``feedback_mode`` forms it (``fa_triton.methods``):
    "matrix": ``feedback``; "sign": ``feedback_scale``·sign(``weight``); "magnitude_sign":
    |``feedback``|·sign(``weight``); "random_sign": |R|·sign(``weight``) with |R| =
    ``feedback_scale``·U(0, 1) drawn by Philox from ``seed`` and the draw number in ``counter``
    (int64 [1], read on the device). ``delta_out``, an optional [M, N] tensor of B's dtype with
    unit column stride into which δ is also written (for the weight kernel to read); ``out``,
    an optional [M, K] tensor for grad_x; ``config`` as in :func:`fa_linear_forward`.
    Returns grad_x [M, K] (contiguous unless ``out`` says otherwise), in B's dtype.
    """
    if feedback_mode not in FEEDBACK_MODES:
        raise ValueError(f"feedback_mode must be one of {FEEDBACK_MODES}, got {feedback_mode!r}")
    if feedback_mode == "matrix" and feedback is None:
        raise ValueError("feedback_mode='matrix' needs feedback (B)")
    if feedback_mode != "matrix" and weight is None:
        raise ValueError(f"feedback_mode={feedback_mode!r} needs weight (B is formed from its sign)")
    if feedback_mode == "magnitude_sign" and feedback is None:
        raise ValueError("feedback_mode='magnitude_sign' needs feedback (the magnitudes R)")
    source = feedback if feedback_mode == "matrix" else weight
    if feedback_mode == "random_sign" and (counter is None or counter.numel() != 1 or counter.dtype != torch.int64):
        raise ValueError("feedback_mode='random_sign' needs counter, an int64 tensor of one element")
    M, N = grad_y.shape
    K = source.shape[1]
    if out is None:
        grad_x = torch.empty((M, K), device=grad_y.device, dtype=source.dtype)
    else:
        _check_out(out, (M, K), source, "out")
        grad_x = out
    if delta_out is not None:
        _check_out(delta_out, (M, N), source, "delta_out")
        if delta_out.stride(1) != 1 and N > 1:
            raise ValueError(f"delta_out must have a unit column stride, got strides {delta_out.stride()}")
    if M == 0:
        return grad_x
    if config is not None:
        config = as_config(config)
    saved_arg = saved if saved is not None else grad_y
    feedback_arg = feedback if feedback is not None else source
    weight_arg = weight if weight is not None else source
    precision = _dot_precision(source.dtype)
    key = ("backward_input", grad_y.device, source.dtype, grad_y.dtype, saved_arg.dtype, M, N, K, grad_y.stride(),
           saved_arg.stride(), feedback_arg.stride(), weight_arg.stride(), grad_x.stride(),
           None if delta_out is None else delta_out.stride(0), activation, feedback_mode, precision, config)
    counter_arg = counter if counter is not None else grad_x  # read only by "random_sign"
    run_args = (grad_y, saved_arg, feedback_arg, weight_arg, counter_arg, grad_x, delta_out, negative_slope,
                float(feedback_scale), seed)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _backward_input_plan(key, run_args, activation, feedback_mode, precision, config)
    plan(*run_args)
    return grad_x


def _backward_input_plan(key, run_args, activation, feedback_mode, precision, config):
    grad_y, saved, feedback, weight, _, grad_x, delta_out = run_args[:7]
    M, N = grad_y.shape
    K = grad_x.shape[1]
    store_delta = delta_out is not None
    use_int64 = _needs_int64(grad_y, saved, feedback, weight, grad_x, delta_out)
    # The tensor-descriptor kernel loads B as stored: the rules that form B run the pointer kernel.
    tma_layout = feedback_mode == "matrix" and not use_int64 and _tma_layout(grad_y, saved, feedback, grad_x)
    device_index = _device_index(grad_x)
    stride_dm = delta_out.stride(0) if store_delta else 0
    strides = (grad_y.stride(0), grad_y.stride(1), saved.stride(0), saved.stride(1), feedback.stride(0),
               feedback.stride(1), weight.stride(0), weight.stride(1), grad_x.stride(0), grad_x.stride(1), stride_dm)

    def build(cfg: LaunchConfig):
        _check_tma(cfg, tma_layout, "backward-input")
        grid = (triton.cdiv(M, cfg.block_rows) * triton.cdiv(K, cfg.block_cols),)
        common = dict(ACTIVATION=activation, INPUT_PRECISION=precision, STORE_DELTA=store_delta,
                      BLOCK_M=cfg.block_rows, BLOCK_K=cfg.block_cols, BLOCK_N=cfg.block_red, GROUP_M=cfg.group,
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        meta = dict(common, USE_INT64=use_int64, FEEDBACK=feedback_mode)

        def run(grad_y, saved, feedback, weight, counter, grad_x, delta, slope, scale, seed):
            jit.backward_input_kernel.run(
                grad_y, saved, feedback, weight, counter, grad_x, grad_x if delta is None else delta,
                M, N, K, *strides, float(slope), scale, seed, grid=grid, warmup=False, **meta)

        if not cfg.tma:
            return _with_device(device_index, run)
        bm, bk, bn = cfg.block_rows, cfg.block_cols, cfg.block_red

        def run_tma(grad_y, saved, feedback, weight, counter, grad_x, delta, slope, scale, seed):
            if not _aligned(grad_y, saved, feedback, grad_x):
                return run(grad_y, saved, feedback, weight, counter, grad_x, delta, slope, scale, seed)
            g_desc = _descriptor(grad_y, bm, bn)
            jit.backward_input_tma_kernel.run(
                g_desc, g_desc if saved is grad_y else _descriptor(saved, bm, bn), _descriptor(feedback, bn, bk),
                _descriptor(grad_x, bm, bk), grad_x if delta is None else delta,
                M, N, K, stride_dm, float(slope), grid=grid, warmup=False, **common)
        return _with_device(device_index, run_tma)

    # The rule that forms B changes the kernel's cost: it is part of the tuning key.
    tuned_as = activation if feedback_mode == "matrix" else f"{activation}/{feedback_mode}"
    return _plan(key, build, config, "backward_input", M, K, N, "rows", dtype=grad_x.dtype,
                 device=grad_x.device, precision=precision, activation=tuned_as, bias_grad=False,
                 store=store_delta, tma_layout=tma_layout, run_args=run_args)


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

    Args: grad_y [M, N] (δ itself with ``activation="identity"``), saved [M, N] or None
    (identity), x [M, K]; ``split_k``, at most this many batch slices reduced by separate
    programs and then summed in a fixed order (None: the config's; 1: no split); ``config``
    as in :func:`fa_linear_forward`; ``out``, optional (grad_W [N, K] contiguous, grad_b [N]
    or None) to write into.
    Returns: grad_W [N, K] and grad_b [N] (None unless ``bias_grad``), in x's dtype.
    """
    if split_k is not None and (isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"split_k must be None or an int >= 1, got {split_k!r}")
    M, N = grad_y.shape
    K = x.shape[1]
    if out is None:
        grad_w = torch.empty((N, K), device=x.device, dtype=x.dtype)
        grad_b = torch.empty((N,), device=x.device, dtype=x.dtype) if bias_grad else None
    else:
        grad_w, grad_b = out
        _check_out(grad_w, (N, K), x, "out[0]")
        if not grad_w.is_contiguous():
            raise ValueError(f"out[0] (grad_W) must be contiguous, got strides {grad_w.stride()}")
        if bias_grad:
            _check_out(grad_b, (N,), x, "out[1]")
            if grad_b.stride(0) != 1 and N > 1:
                raise ValueError(f"out[1] (grad_b) must have a unit stride, got stride {grad_b.stride()}")
    if M == 0:
        grad_w.zero_()
        if grad_b is not None:
            grad_b.zero_()
        return grad_w, grad_b if bias_grad else None
    if config is not None:
        config = as_config(config)
    saved_arg = saved if saved is not None else grad_y
    precision = _dot_precision(x.dtype)
    key = ("backward_weight", x.device, x.dtype, grad_y.dtype, saved_arg.dtype, M, N, K, grad_y.stride(),
           saved_arg.stride(), x.stride(),
           bias_grad, activation, precision, config, split_k)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _backward_weight_plan(key, grad_y, saved_arg, x, grad_w, grad_b, activation, negative_slope, bias_grad,
                                     precision, config, split_k)
    plan(grad_y, saved_arg, x, grad_w, grad_b, negative_slope)
    return grad_w, grad_b if bias_grad else None


def _backward_weight_plan(key, grad_y, saved, x, grad_w, grad_b, activation, negative_slope, bias_grad, precision,
                          config, split_k):
    M, N = grad_y.shape
    K = x.shape[1]
    use_int64 = _needs_int64(grad_y, saved, x, grad_w)
    tma_layout = not use_int64 and _tma_layout(grad_y, saved, x)
    device_index = _device_index(x)
    outputs = tuning.split_outputs("backward_weight", N, K, bias_grad)
    strides = (grad_y.stride(0), grad_y.stride(1), saved.stride(0), saved.stride(1), x.stride(0), x.stride(1))

    def build(cfg: LaunchConfig):
        _check_tma(cfg, tma_layout, "backward-weight")
        # A forced split_k may use slices of a single reduction block (tests, experiments).
        split = tuning.cap_split(cfg.split if split_k is None else split_k, M, outputs, cfg.block_red)
        splits, rows_per_split = tuning.split_plan(M, split, cfg.block_red)
        # At least one column of K tiles: its programs also write grad_b (in_features = 0 included).
        grid = (triton.cdiv(N, cfg.block_rows) * max(1, triton.cdiv(K, cfg.block_cols)), splits)
        common = dict(HAS_BIAS_GRAD=bias_grad, ACTIVATION=activation, INPUT_PRECISION=precision,
                      BLOCK_N=cfg.block_rows, BLOCK_K=cfg.block_cols, BLOCK_M=cfg.block_red, GROUP_N=cfg.group,
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        meta = dict(common, USE_INT64=use_int64)
        # Unsplit: straight into grad_w (contiguous) and grad_b. Split: fp32 partials
        # [splits, N·K (+N)], which split_sum_kernel then adds in slice order.
        out_strides = (0, K, 1, 0) if splits == 1 else (outputs, K, 1, outputs)
        sum_grid = (triton.cdiv(outputs, 1024),)

        def outputs_of(x, grad_w, grad_b):
            if splits == 1:
                return None, grad_w, grad_w if grad_b is None else grad_b
            partial = torch.empty((splits, outputs), device=x.device, dtype=torch.float32)
            return partial, partial, partial[:, N * K:] if bias_grad else partial

        def sum_splits(partial, grad_w, grad_b):
            jit.split_sum_kernel.run(partial, grad_w, grad_w if grad_b is None else grad_b, N * K, outputs, splits,
                                     partial.stride(0), grid=sum_grid, warmup=False, BLOCK=1024, num_warps=4)

        def run(grad_y, saved, x, grad_w, grad_b, slope):
            partial, w_out, b_out = outputs_of(x, grad_w, grad_b)
            jit.backward_weight_kernel.run(
                grad_y, saved, x, w_out, b_out, M, N, K, rows_per_split, *strides, *out_strides, float(slope),
                grid=grid, warmup=False, **meta)
            if partial is not None:
                sum_splits(partial, grad_w, grad_b)

        if not cfg.tma:
            return _with_device(device_index, run)
        bn, bk, bm = cfg.block_rows, cfg.block_cols, cfg.block_red

        def run_tma(grad_y, saved, x, grad_w, grad_b, slope):
            if not _aligned(grad_y, saved, x):
                return run(grad_y, saved, x, grad_w, grad_b, slope)
            partial, w_out, b_out = outputs_of(x, grad_w, grad_b)
            g_desc = _descriptor(grad_y, bm, bn)
            jit.backward_weight_tma_kernel.run(
                g_desc, g_desc if saved is grad_y else _descriptor(saved, bm, bn), _descriptor(x, bm, bk), w_out, b_out,
                M, N, K, rows_per_split, *out_strides, float(slope), grid=grid, warmup=False, **common)
            if partial is not None:
                sum_splits(partial, grad_w, grad_b)
        return _with_device(device_index, run_tma)

    return _plan(key, build, config, "backward_weight", N, K, M, "red", dtype=x.dtype, device=x.device,
                 precision=precision, activation=activation, bias_grad=bias_grad, store=False,
                 tma_layout=tma_layout, run_args=(grad_y, saved, x, grad_w, grad_b, negative_slope))


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
    M, K = error.shape
    N = feedback.shape[1]
    if out is None:
        delta = torch.empty((M, N), device=error.device, dtype=feedback.dtype)
    else:
        _check_out(out, (M, N), feedback, "out")
        delta = out
    if M == 0 or N == 0:
        return delta
    if config is not None:
        config = as_config(config)
    saved_arg = saved if saved is not None else delta
    precision = _dot_precision(feedback.dtype)
    key = ("dfa", error.device, error.dtype, feedback.dtype, saved_arg.dtype, M, N, K, error.stride(),
           feedback.stride(), saved_arg.stride(), delta.stride(), activation, precision, config)
    run_args = (error, feedback, saved_arg, delta, negative_slope)
    plan = _PLANS.get(key)
    if plan is None:
        use_int64 = _needs_int64(error, feedback, saved_arg, delta)
        strides = (*error.stride(), *feedback.stride(), *saved_arg.stride(), *delta.stride())
        device_index = _device_index(delta)

        def build(cfg: LaunchConfig):
            _check_tma(cfg, False, "DFA")
            grid = (triton.cdiv(M, cfg.block_rows) * triton.cdiv(N, cfg.block_cols),)
            meta = dict(ACTIVATION=activation, INPUT_PRECISION=precision, USE_INT64=use_int64, BLOCK_M=cfg.block_rows,
                        BLOCK_N=cfg.block_cols, BLOCK_K=cfg.block_red, GROUP_M=cfg.group, num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages)

            def run(error, feedback, saved, delta, slope):
                jit.dfa_delta_kernel.run(error, feedback, saved, delta, M, N, K, *strides, float(slope), grid=grid,
                                         warmup=False, **meta)
            return _with_device(device_index, run)

        plan = _plan(key, build, config, "dfa", M, N, K, "rows", dtype=feedback.dtype, device=delta.device,
                     precision=precision, activation=activation, bias_grad=False, store=False, tma_layout=False,
                     run_args=run_args)
    plan(*run_args)
    return delta
