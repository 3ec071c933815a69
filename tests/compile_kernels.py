"""The offline compile and loop guard of fa_triton's kernels, for real GPUs, without one.

    python -m tests.compile_kernels [--variants a,b] [--arch 90,80] [--list] [--table]

Run without TRITON_INTERPRET (tests/test_kernel_compile.py starts it in subprocesses). Each
variant calls a launcher on meta tensors (no memory, no GPU) with an explicit LaunchConfig, as
a real launch on an H100/H200 (132 SMs) would get it: every autotuning candidate of the square
8192³ layers, the heuristic's and the candidates' configs at the founding tutorial's layers,
every activation, feedback rule and memory pass. Each recorded launch is compiled with
Triton's own compiler (tests/loop_facts.py) and read: for sm_90 the facts of its main K-loop
(TTGIR, PTX, SASS) and its flags; each GEMM also compiled as the Triton tutorial GEMM
(``fa_triton.kernels.tutorial_gemm``) of the same tile, layout, dtype and sizes, whose SASS
instructions per loop iteration are the yardstick. Prints one JSON object per launch and arch:
variant, kernel, arch, dtype, precision, tile, layout, ok, error, facts, flags, tutorial_ops.
``--table`` prints them as a table instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("tests.compile_kernels compiles for a GPU: run it without TRITON_INTERPRET=1")

from fa_triton.kernels import launchers, tuning, tutorial_gemm  # noqa: E402
from fa_triton.kernels.tuning import LaunchConfig, Problem  # noqa: E402
from fa_triton.rules.activations import saves_extra  # noqa: E402
from tests.loop_facts import compile_sm90, loop_facts, loop_flags, native_specialize_impl, record_launches  # noqa: E402

SMS = 132  # an H100 SXM / H200: the GPU the heuristic and the candidates are computed for
SQUARE = 8192
TUTORIAL_LAYERS = ((784, 128, "relu"), (128, 64, "relu"), (64, 10, "identity"))  # (in, out, activation)
ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu", "identity")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32, "ieee": torch.float32}
# Each GEMM kernel: its tile's (rows, cols, reduction) block names, and its layout as the
# tutorial's A·B: NT = A Bᵀ (x Wᵀ), NN = A B (δ B, e B), TN = Aᵀ B (δᵀ x).
GEMMS = {
    "forward_kernel": ("BLOCK_M", "BLOCK_N", "BLOCK_K", "NT"),
    "forward_tma_kernel": ("BLOCK_M", "BLOCK_N", "BLOCK_K", "NT"),
    "backward_input_kernel": ("BLOCK_M", "BLOCK_K", "BLOCK_N", "NN"),
    "backward_input_tma_kernel": ("BLOCK_M", "BLOCK_K", "BLOCK_N", "NN"),
    "backward_weight_kernel": ("BLOCK_N", "BLOCK_K", "BLOCK_M", "TN"),
    "backward_weight_tma_kernel": ("BLOCK_N", "BLOCK_K", "BLOCK_M", "TN"),
    "dfa_delta_kernel": ("BLOCK_M", "BLOCK_N", "BLOCK_K", "NN"),
    "mlp_weight_grad_kernel": ("BLOCK_N", "BLOCK_K", "BLOCK_M", "TN"),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One launcher call to record and compile; ``dims``: its GEMM's (rows, cols, reduction)."""

    call: object
    dtype: str
    archs: tuple = (90,)
    dims: tuple | None = None


def _meta(*shape, dtype, strides=None):
    if strides is not None:
        return torch.empty_strided(shape, strides, device="meta", dtype=dtype)
    return torch.empty(shape, device="meta", dtype=dtype)


def describe(cfg: LaunchConfig) -> str:
    return (f"{cfg.block_rows}x{cfg.block_cols}x{cfg.block_red}-w{cfg.num_warps}s{cfg.num_stages}"
            + (f"-split{cfg.split}" if cfg.split > 1 else "") + ("-tma" if cfg.tma else ""))


def _jobs(M, K, N, dt: str, activation="relu", bias=True, chain=None):
    """The layer's three GEMM jobs as the autograd runs them (the δ pass apart): kernel -> (the
    launcher call for a config, its problem as the tuner sees it). x [M, K], W [N, K]. With
    ``chain`` (the activation of the layer below), also FASequential's step through this layer:
    δ_below = (δ B) ⊙ f'(y_below), DFA's projection kernel."""
    d = DTYPES[dt]
    precision = "ieee" if dt == "ieee" else "tf32"
    x, weight, delta = _meta(M, K, dtype=d), _meta(N, K, dtype=d), _meta(M, N, dtype=d)
    extra = saves_extra(activation, 0.01)
    aligned = K * d.itemsize % 16 == 0 and N * d.itemsize % 16 == 0  # every operand's rows: TMA can address them
    return {
        "forward": (lambda cfg: launchers.fa_linear_forward(x, weight, _meta(N, dtype=d) if bias else None, activation,
                                                           0.01, extra, config=cfg),
                    Problem("forward", M, N, K, "rows", d, precision, activation, extra, aligned)),
        "backward_input": (lambda cfg: launchers.fa_linear_backward_input(delta, None, weight, "identity", config=cfg),
                           Problem("backward_input", M, K, N, "rows", d, precision, "", False, aligned)),
        "backward_weight": (lambda cfg: launchers.fa_linear_backward_weight(delta, None, x, "identity", 0.0, False,
                                                                           config=cfg),
                            Problem("backward_weight", N, K, M, "red", d, precision, "", False, aligned)),
    } | ({} if chain is None else {
        "chain": (lambda cfg: launchers.fa_linear_dfa_delta(delta, weight, x, chain, 0.01, config=cfg),
                  Problem("dfa", M, K, N, "rows", d, precision, chain, False, False)),
    })


def _mlp_call(M, K, widths, dt, activations=None):
    """The fused MLP's launcher on meta tensors x [M, K] -> widths (relu, identity last by default)."""
    d = DTYPES[dt]
    weights, width = [], K
    for n in widths:
        weights.append(_meta(n, width, dtype=d))
        width = n
    activations = activations or ("relu",) * (len(widths) - 1) + ("identity",)
    return functools.partial(launchers.fa_mlp_forward, _meta(M, K, dtype=d), weights,
                             [_meta(n, dtype=d) for n in widths], list(activations), [0.01] * len(widths))


def _mlp_backward_call(M, K, widths, dt, grad_x, activations=None):
    """The fused MLP's backward launcher on meta tensors (relu, identity at the top by default)."""
    d = DTYPES[dt]
    activations = activations or ("relu",) * (len(widths) - 1) + ("identity",)
    outputs = [_meta(M, n, dtype=d) for n in widths[:-1]] + [None if activations[-1] == "identity" else
                                                             _meta(M, widths[-1], dtype=d)]
    feedbacks = [_meta(n, k, dtype=d) for n, k in zip(widths, (K,) + tuple(widths[:-1]))]
    return functools.partial(launchers.fa_mlp_backward, _meta(M, widths[-1], dtype=d), outputs,
                             feedbacks if grad_x else [None] + feedbacks[1:], list(activations), [0.01] * len(widths),
                             grad_x, [True] * len(widths))


def _dims(problem: Problem) -> tuple:
    return problem.rows, problem.cols, problem.red


def _add_jobs(v: dict, prefix: str, M, K, N, dt, which, archs=(90,), activation="relu", seen=None, chain=None):
    """Variants of the three jobs (four with ``chain``): ``which`` is "candidates" (every
    autotuning candidate), "heuristic", or a list of configs (TMA ones only where the layout
    allows them). With ``seen``, a set, a config whose compiled kernel another variant already
    has is skipped."""
    for kernel, (call, problem) in _jobs(M, K, N, dt, activation, chain=chain).items():
        name = problem.kernel
        if which == "candidates":
            configs = tuning.candidate_configs(name, problem.rows, problem.cols, problem.red, problem.dtype, SMS,
                                               tuning.tma_fits(problem) and name != "dfa")
        elif which == "heuristic":
            configs = [tuning.heuristic_config(name, problem.rows, problem.cols, problem.red, problem.dtype, SMS)]
        else:
            configs = [c for c in which if not c.tma or tuning.tma_fits(problem)]
        for cfg in configs:
            signature = (kernel, dt, activation, cfg.replace(split=min(cfg.split, 2)), N % 8 == 0, K % 8 == 0)
            if seen is not None:
                if signature in seen:
                    continue
                seen.add(signature)
            v[f"{prefix}-{kernel}-{describe(cfg)}"] = Variant(functools.partial(call, cfg), dt, archs, _dims(problem))


def variants() -> dict[str, Variant]:
    v: dict[str, Variant] = {}
    big, square = LaunchConfig(128, 256, 64, 8, 3), LaunchConfig(128, 128, 64, 8, 4)
    # Every candidate the tuner may pick for the square layers, TMA ones included.
    _add_jobs(v, "square-bf16", SQUARE, SQUARE, SQUARE, "bf16", "candidates")
    _add_jobs(v, "square-fp16", SQUARE, SQUARE, SQUARE, "fp16", [big, big.replace(tma=True)])
    _add_jobs(v, "square-tf32", SQUARE, SQUARE, SQUARE, "tf32", "candidates")
    _add_jobs(v, "square-ieee", SQUARE, SQUARE, SQUARE, "ieee", "candidates")
    # What Ampere builds: the 128x128 tile (Hopper's largest do not fit its shared memory).
    _add_jobs(v, "square-bf16-sm80", SQUARE, SQUARE, SQUARE, "bf16", [square], archs=(80,))
    # The founding tutorial's layers at batch 64 to 8192: every candidate the tuner may time, in
    # every dtype, each distinct compiled kernel once (the same tile and flags at another batch
    # size compile to the same code).
    # FASequential's step through each layer above the first (f' of the layer below, relu, in the
    # epilogue of DFA's projection kernel).
    seen = set()
    for index, (K, N, activation) in enumerate(TUTORIAL_LAYERS):
        chain = TUTORIAL_LAYERS[index - 1][2] if index else None
        for M in (64, 128, 1024, 8192):
            for dt in ("bf16", "tf32", "ieee"):
                _add_jobs(v, f"tutorial-{M}x{K}x{N}-{dt}", M, K, N, dt, "candidates", activation=activation,
                          seen=seen, chain=chain)
        # What an A100 gets there (no TMA; the heuristic's tiles).
        for M in (64, 8192):
            _add_jobs(v, f"tutorial-sm80-{M}x{K}x{N}-bf16", M, K, N, "bf16", "heuristic", archs=(80,),
                      activation=activation)
    # Every activation's epilogue (and its extra tensor), with and without bias, pointer and TMA.
    for activation in ACTIVATIONS:
        for bias in (True, False):
            for cfg in (big, big.replace(tma=True)):
                call, problem = _jobs(SQUARE, SQUARE, SQUARE, "bf16", activation, bias)["forward"]
                v[f"epilogue-{activation}-{'bias' if bias else 'nobias'}-{describe(cfg)}"] = Variant(
                    functools.partial(call, cfg), "bf16", dims=_dims(problem))
    # DFA's projection, every activation in its epilogue (a long K loop: n_out = 8192).
    for activation in ACTIVATIONS:
        for dt, cfg in (("bf16", square), ("tf32", LaunchConfig(128, 128, 32, 8, 3))):
            d = DTYPES[dt]
            v[f"dfa-{dt}-{activation}-{describe(cfg)}"] = Variant(functools.partial(
                launchers.fa_linear_dfa_delta, _meta(SQUARE, SQUARE, dtype=d), _meta(SQUARE, SQUARE, dtype=d),
                _meta(SQUARE, SQUARE, dtype=d), activation, 0.01, config=cfg), dt, (90, 80) if dt == "bf16" else (90,),
                (SQUARE, SQUARE, SQUARE))
    # The memory passes: δ and grad_b, B of the sign rules (their loops hold no dot: no spills).
    for dt in ("bf16", "ieee"):
        d = DTYPES[dt]
        for activation in ACTIVATIONS:
            v[f"local_error-{dt}-{activation}"] = Variant(functools.partial(
                launchers.fa_linear_local_error, _meta(SQUARE, SQUARE, dtype=d), _meta(SQUARE, SQUARE, dtype=d),
                activation, 0.01, config=tuning.pass_config(SQUARE, SQUARE, SMS, False)), dt, (90, 80))
        for mode in ("usf", "frsf", "brsf"):
            v[f"feedback-{dt}-{mode}"] = Variant(functools.partial(
                launchers.fa_linear_feedback, _meta(SQUARE, SQUARE, dtype=d), _meta(SQUARE, SQUARE, dtype=d), mode,
                feedback_scale=0.05, seed=2**40 + 7, counter=_meta(1, dtype=torch.int64)), dt, (90, 80))
    # The fused narrow MLP (one launch for a chain's forward): the tutorial's 784-128-64-10 at the
    # heuristic's configs, and the widest chain it takes (four layers 128 wide), in every dtype.
    for M in (64, 8192):
        for dt in ("bf16", "fp16", "tf32"):  # IEEE fp32 is not fused (launchers.mlp_fusable)
            v[f"mlp-tutorial-{M}-{dt}"] = Variant(_mlp_call(M, 784, (128, 64, 10), dt), dt,
                                                  (90, 80) if dt == "bf16" else (90,))
    for dt in ("bf16", "tf32"):
        v[f"mlp-4x128-{dt}"] = Variant(_mlp_call(8192, 128, (128, 128, 128, 128), dt, ("gelu", "tanh", "sigmoid",
                                                                                          "leaky_relu")), dt, (90, 80))
    # Its backward's δ chain: the tutorial's widths (with grad_x at batch 64, without at 8192, as
    # a first layer on data has it) and four layers 128 wide.
    for M, grad_x in ((64, True), (8192, False)):
        for dt in ("bf16", "fp16", "tf32"):
            v[f"mlp-backward-tutorial-{M}-{dt}"] = Variant(_mlp_backward_call(M, 784, (128, 64, 10), dt, grad_x), dt,
                                                           (90, 80) if dt == "bf16" else (90,))
    for dt in ("bf16", "tf32"):
        v[f"mlp-backward-4x128-{dt}"] = Variant(_mlp_backward_call(8192, 128, (128,) * 4, dt, True, (
            "tanh", "sigmoid", "leaky_relu", "relu")), dt, (90, 80))
    # Its grouped weight gradients (the loop of layer 1's tiles is the one compared: δᵀ x, TN).
    for M in (64, 1024):
        for dt in ("bf16", "fp16", "tf32"):
            d = DTYPES[dt]
            widths, inputs = (128, 64, 10), (784, 128, 64)
            v[f"mlp-weight-grads-tutorial-{M}-{dt}"] = Variant(functools.partial(
                launchers.fa_mlp_weight_grads, [_meta(M, n, dtype=d) for n in widths],
                [_meta(M, k, dtype=d) for k in inputs], [True] * 3), dt, (90, 80) if dt == "bf16" else (90,),
                (128, 784, M))
    # Stacked launches (8 seeds of the tutorial's network in one pass: the model as the grid's third
    # axis) at the configs they get, every job, and the sign rules' B.
    for K, N, activation in TUTORIAL_LAYERS:
        for dt in ("bf16", "tf32"):
            d, models, M = DTYPES[dt], 8, 64
            x, weight, delta = _meta(models, M, K, dtype=d), _meta(models, N, K, dtype=d), _meta(models, M, N, dtype=d)
            prefix = f"stacked-{models}x{M}x{K}x{N}-{dt}"

            def config(job, rows, cols, red, d=d, models=models):  # as the launcher picks it on 132 SMs
                return tuning.heuristic_config(job, rows, cols, red, d, SMS // models).replace(split=1)

            v[f"{prefix}-forward"] = Variant(functools.partial(
                launchers.fa_stacked_forward, x, weight, _meta(models, N, dtype=d), activation,
                config=config("forward", M, N, K)), dt, (90, 80), (M, N, K))
            v[f"{prefix}-local_error"] = Variant(functools.partial(
                launchers.fa_stacked_local_error, delta, delta, activation), dt, (90, 80))
            v[f"{prefix}-backward_input"] = Variant(functools.partial(
                launchers.fa_stacked_backward_input, delta, weight, config=config("backward_input", M, K, N)), dt,
                (90, 80), (M, K, N))
            v[f"{prefix}-backward_weight"] = Variant(functools.partial(
                launchers.fa_stacked_backward_weight, delta, x, config=config("backward_weight", N, K, M)), dt,
                (90, 80), (N, K, M))
    v["stacked-feedback-bf16-brsf"] = Variant(functools.partial(
        launchers.fa_stacked_feedback, _meta(8, 128, 784, dtype=torch.bfloat16), None, "brsf", feedback_scale=0.05,
        seed=7, counter=_meta(1, dtype=torch.int64)), "bf16", (90, 80))
    # int64 offsets, for real: 2^21 + 1 rows of 1024, and a stride of 2^31; odd sizes, small tiles.
    mid, small = LaunchConfig(64, 64, 64, 4, 4), LaunchConfig(16, 16, 16, 4, 3)
    f16 = torch.float16
    v["int64-forward-fp16"] = Variant(functools.partial(
        launchers.fa_linear_forward, _meta(2**21 + 1, 1024, dtype=f16), _meta(16, 1024, dtype=f16), None, "identity",
        config=mid), "fp16", dims=(2**21 + 1, 16, 1024))
    v["int64-backward_weight-fp16"] = Variant(functools.partial(
        launchers.fa_linear_backward_weight, _meta(64, 16, dtype=f16), _meta(64, 16, dtype=f16),
        _meta(64, 1024, dtype=f16, strides=(2**31, 1)), "leaky_relu", 0.01, False, config=mid), "fp16",
        dims=(16, 1024, 64))
    v["odd-forward-fp16-7x17x113"] = Variant(functools.partial(
        launchers.fa_linear_forward, _meta(7, 17, dtype=f16), _meta(113, 17, dtype=f16), _meta(113, dtype=f16), "gelu",
        0.01, True, config=small), "fp16", dims=(7, 113, 17))
    v["odd-backward_weight-fp16-7x17x113-split"] = Variant(functools.partial(
        launchers.fa_linear_backward_weight, _meta(7, 113, dtype=f16), _meta(7, 113, dtype=f16),
        _meta(7, 17, dtype=f16), "relu", 0.01, True, config=small.replace(split=2)), "fp16", dims=(113, 17, 7))
    return v


# ---------------------------------------------------------------------------------- compiling

def record(call) -> list[tuple[str, tuple, dict]]:
    """(kernel name, args, kwargs) of every launch ``call()`` makes, in order; nothing runs."""
    recorded, saved = [], {}
    for name, kernel in launchers.JIT_KERNELS.items():
        saved[name] = vars(kernel).get("run")  # an instance attribute (a recorder), else the class's

        def recorder(*args, grid, warmup, _name=name, **kwargs):
            recorded.append((_name, args, kwargs))

        kernel.run = recorder
    try:
        launchers.clear_plans()
        call()
    finally:
        for name, kernel in launchers.JIT_KERNELS.items():
            if saved[name] is None:
                del kernel.run
            else:
                kernel.run = saved[name]
    return recorded


@functools.lru_cache(maxsize=None)
def tutorial_ops(layout: str, dt: str, precision: str, tile: tuple, dims: tuple):
    """SASS instructions per main-loop iteration of the tutorial GEMM of this tile, layout,
    dtype and sizes (rows × cols, reduction), compiled for sm_90; None if it has no SASS loop."""
    rows, cols, red = dims
    d = DTYPES[dt]
    a = _meta(red, rows, dtype=d).t() if layout == "TN" else _meta(rows, red, dtype=d)
    b = _meta(cols, red, dtype=d).t() if layout == "NT" else _meta(red, cols, dtype=d)
    block_m, block_n, block_k, num_warps, num_stages = tile
    fn = tutorial_gemm.tutorial_matmul_kernel
    (args, kwargs), = record_launches(fn, lambda: tutorial_gemm.tutorial_matmul(
        a, b, block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
        input_precision=precision))
    facts = loop_facts(compile_sm90(fn, args, kwargs))
    return facts.get("sass_ops"), loop_flags(facts)


def compile_variant(name: str, variant: Variant, archs=None) -> list[dict]:
    """One row per recorded launch and architecture (see the module docstring)."""
    torch.backends.cuda.matmul.allow_tf32 = variant.dtype == "tf32"
    rows = []
    try:
        launches = record(variant.call)
    except Exception as err:  # noqa: BLE001 - reported, not raised: the launcher refused the call
        return [{"variant": name, "kernel": None, "arch": a, "dtype": variant.dtype, "ok": False,
                 "error": f"{type(err).__name__} in the launcher: {str(err)[-800:]}"} for a in archs or variant.archs]
    for kernel, args, kwargs in launches:
        fn = launchers.JIT_KERNELS[kernel]
        gemm = GEMMS.get(kernel)
        tile = None if gemm is None else (kwargs[gemm[0]], kwargs[gemm[1]], kwargs[gemm[2]], kwargs.get("num_warps", 4),
                                          kwargs.get("num_stages", 3))
        for arch in archs or variant.archs:
            row = {"variant": name, "kernel": kernel, "arch": arch, "dtype": variant.dtype,
                   "precision": kwargs.get("INPUT_PRECISION"), "tile": tile, "layout": gemm and gemm[3]}
            try:
                facts = loop_facts(compile_sm90(fn, args, kwargs, arch))
                row.update(ok=True, flags=loop_flags(facts), **{k: facts.get(k) for k in (
                    "has_loop", "dot_kind", "sass_ops", "hgmma", "serialized", "spill_bytes", "registers",
                    "operand_loads", "warpgroup_waits")})
                if arch == 90 and gemm is not None and facts.get("has_loop") and variant.dims is not None:
                    try:
                        row["tutorial_ops"], row["tutorial_flags"] = tutorial_ops(
                            gemm[3], variant.dtype, row["precision"] or "tf32", tile, variant.dims)
                    except ValueError as err:  # the tutorial has int32 offsets only: no yardstick
                        row["tutorial_error"] = str(err)
            except Exception as err:  # noqa: BLE001 - reported, not raised
                row.update(ok=False, error=f"{type(err).__name__}: {str(err)[-800:]}")
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'variant':<58} {'kernel':<27} {'arch':>4} {'ops':>5} {'tut':>5} {'ratio':>5} {'spill':>5} flags")
    for r in rows:
        ratio = (f"{r['sass_ops'] / r['tutorial_ops']:.2f}" if r.get("sass_ops") and r.get("tutorial_ops") else "-")
        print(f"{r['variant']:<58} {str(r['kernel']):<27} {r['arch']:>4} {str(r.get('sass_ops') or '-'):>5} "
              f"{str(r.get('tutorial_ops') or '-'):>5} {ratio:>5} {str(r.get('spill_bytes', '-')):>5} "
              f"{','.join(r.get('flags') or []) or ('-' if r.get('ok') else 'ERROR ' + r.get('error', ''))}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="", help="comma-separated names (default: all)")
    parser.add_argument("--arch", default="", help="only these architectures, e.g. 90")
    parser.add_argument("--list", action="store_true", help="print the variant names and exit")
    parser.add_argument("--table", action="store_true", help="a table instead of JSON lines")
    args = parser.parse_args(argv)
    if native_specialize_impl is None:
        print(json.dumps({"skip": "this Triton has no offline compile API"}))
        return 0
    all_variants = variants()
    if args.list:
        print("\n".join(all_variants))
        return 0
    names = [n for n in args.variants.split(",") if n] or list(all_variants)
    only = {int(a) for a in args.arch.split(",") if a}
    rows = []
    for name in names:
        variant = all_variants[name]
        for row in compile_variant(name, variant, [a for a in variant.archs if not only or a in only]):
            if args.table:
                rows.append(row)
            else:
                print(json.dumps(row), flush=True)
    if args.table:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
