"""Launch plans of the GEMM kernels (``linear_kernels.py``): one class per job, built once per
:class:`GemmKey` and called with the job's tensors.

Each ``build(key, args)`` chooses the config (the key's own, else ``autotune.select_config``,
which may time candidates by running them on ``args``), prepares the kernel's launch and
caches the plan. A plan is a pointer-kernel launch, a pointer launch with a split reduction
(fp32 partials, then ``split_sum``), or a tensor-descriptor (TMA) launch that falls back to
the pointer kernel for a call whose data is not 16-byte aligned.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import autotune, plans, tuning
from . import linear_kernels as gemm
from . import pass_kernels as passes
from .plans import Launch, cdiv, check_tma, descriptor, on_device, remember, tuning_device
from .tuning import LaunchConfig, Problem


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


def _gemm_meta(cfg: LaunchConfig, precision: str, rows: str, cols: str, red: str, group: str) -> dict:
    return {rows: cfg.block_rows, cols: cfg.block_cols, red: cfg.block_red, group: cfg.group,
            "INPUT_PRECISION": precision, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


# ----------------------------------------------------------------------------------- forward

def _epilogue_halves(activation: str, store_extra: bool, cfg: LaunchConfig) -> bool:
    # gelu's epilogue (erf and exp for y and f'(z)) on a 128x256 tile overflows the register file.
    return store_extra and cfg.block_rows * cfg.block_cols >= 128 * 256


class ForwardPlan:
    """y = f(x Wᵀ + b): args (x, weight, bias, y, extra, negative_slope)."""

    @staticmethod
    def build(key: GemmKey, args: tuple) -> Plan:
        x, weight, _, y, _, _ = args
        no_bias, activation, store_extra = key.flags
        use_int64 = plans.needs_int64(x, weight, y)
        layout_ok = not use_int64 and plans.tma_layout(x, weight, y)
        M, N, K = key.M, key.N, key.K
        flags = dict(HAS_BIAS=not no_bias, STORE_EXTRA=store_extra, ACTIVATION=activation)
        strides = (*x.stride(), *weight.stride(), *y.stride())

        def pointer(cfg: LaunchConfig):
            tiles = cdiv(M, cfg.block_rows) * cdiv(N, cfg.block_cols)
            splits, k_per_split = tuning.split_plan(K, tuning.cap_split(cfg.split, K, M * N, cfg.block_red),
                                                    cfg.block_red)
            main = Launch(gemm.forward_kernel, (tiles, splits), dict(
                flags, USE_INT64=use_int64, SPLIT=splits > 1, EPILOGUE_HALVES=_epilogue_halves(
                    activation, store_extra, cfg), **_gemm_meta(cfg, key.precision, "BLOCK_M", "BLOCK_N", "BLOCK_K",
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
                         strides[4], strides[5], slope)
            return run_split

        def make_runner(cfg: LaunchConfig):
            check_tma(cfg, layout_ok, "forward")
            if not cfg.tma:
                return on_device(x, pointer(cfg))
            fallback = pointer(cfg.replace(tma=False, split=1))
            halves = _epilogue_halves(activation, store_extra, cfg)
            tma = Launch(gemm.forward_tma_kernel, (cdiv(M, cfg.block_rows) * cdiv(N, cfg.block_cols),),
                         dict(flags, EPILOGUE_HALVES=halves,
                              **_gemm_meta(cfg, key.precision, "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")))
            bm, bn, bk = cfg.block_rows, cfg.block_cols, cfg.block_red

            def run_tma(x, weight, bias, y, extra, slope):
                if not plans.aligned(x, weight, y, extra):
                    return fallback(x, weight, bias, y, extra, slope)
                # With epilogue halves the kernel stores through pointers: y's descriptor is unused.
                y_desc = descriptor(y, bm, bn)
                tma(descriptor(x, bm, bk), descriptor(weight, bn, bk), y if bias is None else bias, y_desc,
                    y_desc if extra is None or halves else descriptor(extra, bm, bn), y,
                    y if extra is None else extra, M, N, K, strides[4], strides[5], slope)
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
        use_int64 = plans.needs_int64(delta, feedback, grad_x)
        layout_ok = not use_int64 and plans.tma_layout(delta, feedback, grad_x)
        strides = (*delta.stride(), *feedback.stride(), *grad_x.stride())

        def make_runner(cfg: LaunchConfig):
            check_tma(cfg, layout_ok, "backward-input")
            grid = (cdiv(M, cfg.block_rows) * cdiv(K, cfg.block_cols),)
            meta = _gemm_meta(cfg, key.precision, "BLOCK_M", "BLOCK_K", "BLOCK_N", "GROUP_M")
            pointer = Launch(gemm.backward_input_kernel, grid, dict(meta, USE_INT64=use_int64))

            def run(delta, feedback, grad_x):
                pointer(delta, feedback, grad_x, M, N, K, *strides)

            if not cfg.tma:
                return on_device(grad_x, run)
            tma = Launch(gemm.backward_input_tma_kernel, grid, meta)
            bm, bk, bn = cfg.block_rows, cfg.block_cols, cfg.block_red

            def run_tma(delta, feedback, grad_x):
                if not plans.aligned(delta, feedback, grad_x):
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
        use_int64 = plans.needs_int64(delta, x, grad_w)
        layout_ok = not use_int64 and plans.tma_layout(delta, x)
        strides = (*delta.stride(), *x.stride())

        def make_runner(cfg: LaunchConfig):
            check_tma(cfg, layout_ok, "backward-weight")
            # A forced split_k may use slices of a single reduction block (tests, experiments).
            split = tuning.cap_split(cfg.split if split_k is None else split_k, M, N * K, cfg.block_red)
            splits, rows_per_split = tuning.split_plan(M, split, cfg.block_red)
            grid = (cdiv(N, cfg.block_rows) * cdiv(K, cfg.block_cols), splits)
            meta = _gemm_meta(cfg, key.precision, "BLOCK_N", "BLOCK_K", "BLOCK_M", "GROUP_N")
            pointer = Launch(gemm.backward_weight_kernel, grid, dict(meta, USE_INT64=use_int64))
            tma = Launch(gemm.backward_weight_tma_kernel, grid, meta) if cfg.tma else None
            bn, bk, bm = cfg.block_rows, cfg.block_cols, cfg.block_red

            def run(delta, x, grad_w):
                # Unsplit: straight into grad_w. Split: fp32 partials [splits, N·K], added in order.
                out = grad_w if splits == 1 else torch.empty((splits, N * K), device=x.device, dtype=torch.float32)
                out_strides = (N * K if splits > 1 else 0, K, 1)
                if tma is not None and plans.aligned(delta, x):
                    tma(descriptor(delta, bm, bn), descriptor(x, bm, bk), out, M, N, K, rows_per_split, *out_strides)
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
        use_int64 = plans.needs_int64(error, feedback, saved, delta)
        strides = (*error.stride(), *feedback.stride(), *saved.stride(), *delta.stride())

        def make_runner(cfg: LaunchConfig):
            check_tma(cfg, False, "DFA")
            launch = Launch(gemm.dfa_delta_kernel, (cdiv(M, cfg.block_rows) * cdiv(N, cfg.block_cols),),
                            dict(ACTIVATION=activation, USE_INT64=use_int64,
                                 **_gemm_meta(cfg, key.precision, "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")))

            def run(error, feedback, saved, delta, slope):
                launch(error, feedback, saved, delta, M, N, K, *strides, slope)
            return on_device(delta, run)

        problem = Problem("dfa", M, N, K, "rows", key.dtype, key.precision, activation, False, False)
        return build(key, args, problem, make_runner)
