"""Launch plans: what the launchers (``launchers.py``) decide once per call key and reuse.

A plan holds, for one key (device, dtypes, sizes, strides, flags, dot precision, config), the
config, the grid, the int64 decision, the kernel variant and its constexpr arguments; calling
it costs one dictionary lookup and Triton's own launch. Keys are NamedTuples (typed, hashed
as tuples). Here, in order: the plan cache and the launch objects; the layout facts plans are
built from (int64 offsets, TMA-addressable rows, alignment) and the fp32 dot precision that
follows PyTorch's switch; and the GEMM kernels' plans (``linear_kernels.py``), one class per job.

Each GEMM plan's ``build(key, args)`` chooses the config (the key's own, else
``autotune.select_config``, which may time candidates by running them on ``args``), prepares
the kernel's launch and caches the plan. A plan is a pointer-kernel launch, a pointer launch
with a split reduction (fp32 partials, then ``split_sum``), or a tensor-descriptor (TMA) launch
that falls back to the pointer kernel for a call whose data is not 16-byte aligned.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

try:  # host-side tensor descriptors (Triton >= 3.4); without them only the pointer kernels run
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installation
    TensorDescriptor = None

from . import autotune, tuning
from . import linear_kernels as gemm
from . import pass_kernels as passes
from .tuning import LaunchConfig, Problem

_INT32_MAX = 2**31 - 1

# Plans by key; cleared when it grows past MAX_PLANS (a key per batch size and layout).
PLANS: dict[tuple, object] = {}
MAX_PLANS = 4096
# GENERATION[0] changes whenever PLANS is cleared: a plan kept elsewhere (a layer's eager steps,
# fa_triton.ops.backends.triton.LayerSteps) is valid only while it has not.
GENERATION = [0]


def clear_plans() -> None:
    """Forget every cached launch plan (tuned configs are kept by ``autotune``)."""
    PLANS.clear()
    GENERATION[0] += 1


def remember(key: tuple, plan) -> None:
    if len(PLANS) >= MAX_PLANS:
        clear_plans()
    PLANS[key] = plan


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for ints (``triton.cdiv`` is a constexpr function costing ~2 µs a call on the host)."""
    return -(-a // b)


class Launch:
    """One prepared kernel launch: the ``@triton.jit`` function, its grid and its constexpr and
    compile options."""

    __slots__ = ("kernel", "grid", "meta")

    def __init__(self, kernel, grid: tuple, meta: dict):
        self.kernel, self.grid, self.meta = kernel, grid, meta

    def __call__(self, *args) -> None:
        # JITFunction.run is what kernel[grid](*args) ends in; calling it directly skips a
        # wrapper per launch (bench/launch_overhead.py: the launcher's host cost stays <= 5 µs).
        self.kernel.run(*args, grid=self.grid, warmup=False, **self.meta)


class OnDevice:
    """Runs ``run(*args)`` with the tensors' CUDA device current: Triton launches on the
    *current* device, not on the tensors' own."""

    __slots__ = ("index", "run")

    def __init__(self, index: int, run):
        self.index, self.run = index, run

    def __call__(self, *args):
        if torch.cuda.current_device() == self.index:
            return self.run(*args)
        with torch.cuda.device(self.index):
            return self.run(*args)


def on_device(t: torch.Tensor, run):
    """``run``, made to launch on ``t``'s CUDA device (unchanged for CPU tensors)."""
    return OnDevice(t.device.index, run) if t.is_cuda else run


def tuning_device(device: torch.device):
    """A context making ``device`` current while the tuner times candidates on it."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ----------------------------------------------------------------------------- layout facts

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


def dot_precision(dtype: torch.dtype) -> str:
    """The dots' input precision: fp32 follows PyTorch's switch (IEEE unless the user allowed
    tf32); for half types the setting has no effect and "tf32" is Triton's default."""
    if dtype is torch.float32 and not fp32_matmul_allows_tf32():
        return "ieee"
    return "tf32"


def needs_int64(*tensors: torch.Tensor | None) -> bool:
    """Whether some element offset (Σ (size-1)·stride) of these tensors exceeds int32."""
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        if sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) > _INT32_MAX:
            return True
    return False


def tma_layout(*tensors: torch.Tensor | None) -> bool:
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


def aligned(*tensors: torch.Tensor | None) -> bool:
    """Whether every base pointer is 16-byte aligned (a descriptor's requirement)."""
    for t in tensors:
        if t is not None and t.data_ptr() % 16:
            return False
    return True


def descriptor(t: torch.Tensor, block_rows: int, block_cols: int):
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [block_rows, block_cols])


def check_tma(cfg: LaunchConfig, layout_ok: bool, what: str) -> None:
    if cfg.tma and not layout_ok:
        raise ValueError(
            f"config asks for the tensor-descriptor (TMA) {what} kernel, but the operands' layout does not allow it "
            "(each needs a unit last stride and 16-byte aligned rows); use tma=False"
        )


def check_out(out: torch.Tensor, shape: tuple, like: torch.Tensor, name: str) -> None:
    if out.shape != shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"{name} must be a {like.dtype} tensor of shape {shape} on {like.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )


# ------------------------------------------------------------------------------ GEMM plans

class GemmKey(NamedTuple):
    """What decides a GEMM's launch plan. ``a``, ``b``, ``out``: the strides of the job's
    operands and output, in its argument order; ``flags``: the job's own (activation, bias...)."""

    job: str
    device: torch.device
    dtype: torch.dtype
    other_dtype: torch.dtype
    M: int
    N: int
    K: int
    a: tuple
    b: tuple
    out: tuple
    flags: tuple
    precision: str
    config: LaunchConfig | None


class Plan(NamedTuple):
    """A built plan: the config it launches with (``bench/sweep.py`` reports it) and its runner."""

    config: LaunchConfig
    run: object

    def __call__(self, *args) -> None:
        self.run(*args)


def build(key: GemmKey, args: tuple, problem: Problem, make_runner) -> Plan:
    """The plan of ``key``: ``make_runner(config)`` for the key's config, or the one
    ``autotune.select_config`` picks for ``problem`` (timing runners on ``args``). Remembered
    unless the config is a stand-in chosen during CUDA-graph capture."""
    if key.config is not None:
        config, final = key.config, True
    else:
        runners = {}

        def launch(candidate: LaunchConfig) -> None:
            # Built once per candidate, outside what the tuner times.
            if candidate not in runners:
                runners[candidate] = make_runner(candidate)
            runners[candidate](*args)

        with tuning_device(key.device):
            config, final = autotune.select_config(problem, key.device, launch)
    plan = Plan(config, make_runner(config))
    if final:
        remember(key, plan)
    return plan


def split_sum(partial: torch.Tensor, out: torch.Tensor, splits: int) -> None:
    """out (contiguous) = Σ_s partial[s] ([splits, out.numel()] fp32), slices added in order."""
    numel = out.numel()
    launch = Launch(passes.split_sum_kernel, (cdiv(numel, 1024),), dict(BLOCK=1024, num_warps=4))
    on_device(out, launch)(partial, out, numel, splits)


def gemm_meta(cfg: LaunchConfig, precision: str, rows: str, cols: str, red: str, group: str) -> dict:
    return {rows: cfg.block_rows, cols: cfg.block_cols, red: cfg.block_red, group: cfg.group,
            "INPUT_PRECISION": precision, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


# ----------------------------------------------------------------------------------- forward

def epilogue_halves(activation: str, store_extra: bool, cfg: LaunchConfig) -> bool:
    # gelu's epilogue (erf and exp for y and f'(z)) on a 128x256 tile overflows the register file.
    return store_extra and cfg.block_rows * cfg.block_cols >= 128 * 256


class ForwardPlan:
    """y = f(x Wᵀ + b): args (x, weight, bias, y, extra, negative_slope)."""

    @staticmethod
    def build(key: GemmKey, args: tuple) -> Plan:
        x, weight, _, y, _, _ = args
        no_bias, activation, store_extra = key.flags
        use_int64 = needs_int64(x, weight, y)
        layout_ok = not use_int64 and tma_layout(x, weight, y)
        M, N, K = key.M, key.N, key.K
        flags = dict(HAS_BIAS=not no_bias, STORE_EXTRA=store_extra, ACTIVATION=activation)
        strides = (0, *x.stride(), 0, *weight.stride(), 0, 0, *y.stride())  # one model: no model strides

        def pointer(cfg: LaunchConfig):
            tiles = cdiv(M, cfg.block_rows) * cdiv(N, cfg.block_cols)
            splits, k_per_split = tuning.split_plan(K, tuning.cap_split(cfg.split, K, M * N, cfg.block_red),
                                                    cfg.block_red)
            main = Launch(gemm.forward_kernel, (tiles, splits), dict(
                flags, USE_INT64=use_int64, STACKED=False, SPLIT=splits > 1, EPILOGUE_HALVES=epilogue_halves(
                    activation, store_extra, cfg), **gemm_meta(cfg, key.precision, "BLOCK_M", "BLOCK_N", "BLOCK_K",
                                                                "GROUP_M")))
            if splits == 1:
                def run(x, weight, bias, y, extra, slope):
                    main(x, weight, y if bias is None else bias, y, y if extra is None else extra, y,
                         M, N, K, K, *strides, slope)
                return run

            epilogue = Launch(gemm.forward_split_epilogue_kernel, (cdiv(M, 32), cdiv(N, 64)),
                              dict(flags, BLOCK_M=32, BLOCK_N=64, num_warps=4))

            def run_split(x, weight, bias, y, extra, slope):
                partial = torch.empty((splits, M, N), device=x.device, dtype=torch.float32)
                main(x, weight, partial, partial, partial, partial, M, N, K, k_per_split, *strides, slope)
                epilogue(partial, y if bias is None else bias, y, y if extra is None else extra, M, N, splits,
                         strides[-2], strides[-1], slope)
            return run_split

        def make_runner(cfg: LaunchConfig):
            check_tma(cfg, layout_ok, "forward")
            if not cfg.tma:
                return on_device(x, pointer(cfg))
            fallback = pointer(cfg.replace(tma=False, split=1))
            halves = epilogue_halves(activation, store_extra, cfg)
            tma = Launch(gemm.forward_tma_kernel, (cdiv(M, cfg.block_rows) * cdiv(N, cfg.block_cols),),
                         dict(flags, EPILOGUE_HALVES=halves,
                              **gemm_meta(cfg, key.precision, "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")))
            bm, bn, bk = cfg.block_rows, cfg.block_cols, cfg.block_red

            def run_tma(x, weight, bias, y, extra, slope):
                if not aligned(x, weight, y, extra):
                    return fallback(x, weight, bias, y, extra, slope)
                # With epilogue halves the kernel stores through pointers: y's descriptor is unused.
                y_desc = descriptor(y, bm, bn)
                tma(descriptor(x, bm, bk), descriptor(weight, bn, bk), y if bias is None else bias, y_desc,
                    y_desc if extra is None or halves else descriptor(extra, bm, bn), y,
                    y if extra is None else extra, M, N, K, strides[-2], strides[-1], slope)
            return on_device(x, run_tma)

        problem = Problem("forward", M, N, K, "rows", key.dtype, key.precision, activation, store_extra, layout_ok)
        return build(key, args, problem, make_runner)


# ---------------------------------------------------------------------------- backward input

class BackwardInputPlan:
    """grad_x = δ B: args (delta [M, N], feedback [N, K], grad_x [M, K])."""

    @staticmethod
    def build(key: GemmKey, args: tuple) -> Plan:
        delta, feedback, grad_x = args
        M, N, K = key.M, key.N, key.K
        use_int64 = needs_int64(delta, feedback, grad_x)
        layout_ok = not use_int64 and tma_layout(delta, feedback, grad_x)
        strides = (0, *delta.stride(), 0, *feedback.stride(), 0, *grad_x.stride())  # one model: no model strides

        def make_runner(cfg: LaunchConfig):
            check_tma(cfg, layout_ok, "backward-input")
            grid = (cdiv(M, cfg.block_rows) * cdiv(K, cfg.block_cols),)
            meta = gemm_meta(cfg, key.precision, "BLOCK_M", "BLOCK_K", "BLOCK_N", "GROUP_M")
            pointer = Launch(gemm.backward_input_kernel, grid, dict(meta, USE_INT64=use_int64, STACKED=False))

            def run(delta, feedback, grad_x):
                pointer(delta, feedback, grad_x, M, N, K, *strides)

            if not cfg.tma:
                return on_device(grad_x, run)
            tma = Launch(gemm.backward_input_tma_kernel, grid, meta)
            bm, bk, bn = cfg.block_rows, cfg.block_cols, cfg.block_red

            def run_tma(delta, feedback, grad_x):
                if not aligned(delta, feedback, grad_x):
                    return run(delta, feedback, grad_x)
                tma(descriptor(delta, bm, bn), descriptor(feedback, bn, bk), descriptor(grad_x, bm, bk), M, N, K)
            return on_device(grad_x, run_tma)

        problem = Problem("backward_input", M, K, N, "rows", key.dtype, key.precision, "", False, layout_ok)
        return build(key, args, problem, make_runner)


# --------------------------------------------------------------------------- backward weight

class BackwardWeightPlan:
    """grad_W = δᵀ x: args (delta [M, N], x [M, K], grad_w [N, K] contiguous)."""

    @staticmethod
    def build(key: GemmKey, args: tuple) -> Plan:
        delta, x, grad_w = args
        M, N, K = key.M, key.N, key.K
        (split_k,) = key.flags
        use_int64 = needs_int64(delta, x, grad_w)
        layout_ok = not use_int64 and tma_layout(delta, x)
        strides = (0, *delta.stride(), 0, *x.stride())  # one model: no model strides

        def make_runner(cfg: LaunchConfig):
            check_tma(cfg, layout_ok, "backward-weight")
            # A forced split_k may use slices of a single reduction block (tests, experiments).
            split = tuning.cap_split(cfg.split if split_k is None else split_k, M, N * K, cfg.block_red)
            splits, rows_per_split = tuning.split_plan(M, split, cfg.block_red)
            grid = (cdiv(N, cfg.block_rows) * cdiv(K, cfg.block_cols), splits)
            meta = gemm_meta(cfg, key.precision, "BLOCK_N", "BLOCK_K", "BLOCK_M", "GROUP_N")
            pointer = Launch(gemm.backward_weight_kernel, grid, dict(meta, USE_INT64=use_int64, STACKED=False))
            tma = Launch(gemm.backward_weight_tma_kernel, grid, meta) if cfg.tma else None
            bn, bk, bm = cfg.block_rows, cfg.block_cols, cfg.block_red

            def run(delta, x, grad_w):
                # Unsplit: straight into grad_w. Split: fp32 partials [splits, N·K], added in order.
                out = grad_w if splits == 1 else torch.empty((splits, N * K), device=x.device, dtype=torch.float32)
                out_strides = (0, N * K if splits > 1 else 0, K, 1)
                if tma is not None and aligned(delta, x):
                    tma(descriptor(delta, bm, bn), descriptor(x, bm, bk), out, M, N, K, rows_per_split,
                        *out_strides[1:])
                else:
                    pointer(delta, x, out, M, N, K, rows_per_split, *strides, *out_strides)
                if splits > 1:
                    split_sum(out, grad_w, splits)
            return on_device(x, run)

        problem = Problem("backward_weight", N, K, M, "red", key.dtype, key.precision, "", False, layout_ok)
        return build(key, args, problem, make_runner)


# ------------------------------------------------------------------------------------- DFA

class DFAPlan:
    """δ = (e B) ⊙ f'(saved): args (error [M, K], feedback [K, N], saved [M, N], delta [M, N], slope)."""

    @staticmethod
    def build(key: GemmKey, args: tuple) -> Plan:
        error, feedback, saved, delta, _ = args
        M, N, K = key.M, key.N, key.K
        (activation,) = key.flags
        use_int64 = needs_int64(error, feedback, saved, delta)
        strides = (*error.stride(), *feedback.stride(), *saved.stride(), *delta.stride())

        def make_runner(cfg: LaunchConfig):
            check_tma(cfg, False, "DFA")
            launch = Launch(gemm.dfa_delta_kernel, (cdiv(M, cfg.block_rows) * cdiv(N, cfg.block_cols),),
                            dict(ACTIVATION=activation, USE_INT64=use_int64,
                                 **gemm_meta(cfg, key.precision, "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")))

            def run(error, feedback, saved, delta, slope):
                launch(error, feedback, saved, delta, M, N, K, *strides, slope)
            return on_device(delta, run)

        problem = Problem("dfa", M, N, K, "rows", key.dtype, key.precision, activation, False, False)
        return build(key, args, problem, make_runner)
