"""Compile fa_triton's kernels offline for NVIDIA GPUs, specialised as real launches are.

    python tests/compile_kernels.py [--arch 90,80] [--variants a,b] [--list]

Run without TRITON_INTERPRET (tests/test_kernel_compile.py starts it in a subprocess). Each
variant calls a launcher on meta tensors (no memory, no GPU) with an explicit LaunchConfig while
every kernel's ``run`` is replaced by a recorder; each recorded launch is then compiled with
Triton's own compiler for each architecture, its arguments specialised as the JIT specialises
them at a real launch (integers equal to 1 become constants, 16-divisible integers and pointers
get the divisibility hint). The bundled ptxas reports registers and spills (``-v``). Prints one
JSON object per line: variant, kernel, arch, dtype, block_rows, ok, error, tensor_core (wgmma
on sm_90, mma on sm_80), spill_bytes, registers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_kernels.py compiles for a GPU: run it without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402

from fa_triton.kernels import fa_linear, fa_linear_kernels  # noqa: E402
from fa_triton.kernels.tuning import LaunchConfig  # noqa: E402

try:
    from triton._C.libtriton import native_specialize_impl
except ImportError:  # pragma: no cover - older Triton
    native_specialize_impl = None

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu", "identity")
# The tiles the guard checks: Hopper's largest (as tutorial 03/09 use) and a square one that
# also fits Ampere's register file with the fused prologues.
BIG = LaunchConfig(128, 256, 64, num_warps=8, num_stages=3)
SQUARE = LaunchConfig(128, 128, 64, num_warps=8, num_stages=4)
SQUARE_FP32 = LaunchConfig(128, 128, 32, num_warps=8, num_stages=3)
MID = LaunchConfig(64, 64, 64, num_warps=4, num_stages=4)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One launcher call to record and compile: its dtype and tile decide what is asserted."""

    call: object
    archs: tuple
    dtype: str
    block_rows: int
    tf32: bool = False


def _meta(*shape, dtype, strides=None):
    if strides is not None:
        return torch.empty_strided(shape, strides, device="meta", dtype=dtype)
    return torch.empty(shape, device="meta", dtype=dtype)


def _layer(M, K, N, dtype, activation="relu", bias=True):
    x = _meta(M, K, dtype=dtype)
    weight = _meta(N, K, dtype=dtype)
    saved = None if activation == "identity" else _meta(M, N, dtype=dtype)
    return x, weight, _meta(N, dtype=dtype) if bias else None, _meta(M, N, dtype=dtype), saved


def forward(M, K, N, dtype, activation, config):
    def call():
        x, weight, bias, _, _ = _layer(M, K, N, dtype, activation)
        fa_linear.fa_linear_forward(x, weight, bias, activation, 0.01, activation == "gelu", config=config)
    return call


def backward_input(M, K, N, dtype, activation, config, store_delta=False, feedback_mode="matrix"):
    def call():
        x, feedback, _, grad_y, saved = _layer(M, K, N, dtype, activation)
        delta = _meta(M, N, dtype=dtype) if store_delta else None
        weight = _meta(N, K, dtype=dtype)
        counter = _meta(1, dtype=torch.int64)
        fa_linear.fa_linear_backward_input(grad_y, saved, feedback, activation, 0.01, config=config, delta_out=delta,
                                           feedback_mode=feedback_mode, weight=weight, feedback_scale=0.05,
                                           seed=2**40 + 7, counter=counter)
    return call


def dfa_delta(M, n_out, N, dtype, activation, config):
    def call():
        fa_linear.fa_linear_dfa_delta(_meta(M, n_out, dtype=dtype), _meta(n_out, N, dtype=dtype),
                                      _meta(M, N, dtype=dtype), activation, 0.01, config=config)
    return call


def backward_weight(M, K, N, dtype, activation, config, bias_grad=True, x_strides=None):
    def call():
        x, _, _, grad_y, saved = _layer(M, K, N, dtype, activation)
        if x_strides is not None:
            x = _meta(M, K, dtype=dtype, strides=x_strides)
        fa_linear.fa_linear_backward_weight(grad_y, saved, x, activation, 0.01, bias_grad, config=config)
    return call


def _gemms(M, K, N, dtype, config):
    """The layer's three jobs on one tile: forward, backward-input storing δ, backward-weight
    forming δ itself (relu) and reading the stored δ (identity)."""
    return {
        "forward": forward(M, K, N, dtype, "relu", config),
        "backward_input-delta": backward_input(M, K, N, dtype, "relu", config, store_delta=True),
        "backward_weight-fused": backward_weight(M, K, N, dtype, "relu", config),
        "backward_weight-delta": backward_weight(M, K, N, dtype, "identity", config),
    }


def _variants() -> dict[str, Variant]:
    """Square 4096 layers for the big 16-bit tiles (where the tensor-core and spill checks
    apply), the tutorial's layers and odd sizes for the rest."""
    v = {}
    for name, d in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        for tma in (False, True):
            tag = "tma" if tma else "ptr"
            for job, call in _gemms(4096, 4096, 4096, d, BIG.replace(tma=tma)).items():
                v[f"{job}-{name}-{tag}-128x256"] = Variant(call, (90,), name, 128)
        v[f"backward_weight-{name}-split-8192x784x128"] = Variant(
            backward_weight(8192, 784, 128, d, "relu", MID.replace(split=16)), (90, 80), name, 64)
    for job, call in _gemms(4096, 4096, 4096, torch.bfloat16, SQUARE).items():
        v[f"{job}-bf16-ptr-128x128"] = Variant(call, (90, 80), "bf16", 128)
    v["backward_weight-bf16-tma-split-8192x784x128"] = Variant(
        backward_weight(8192, 784, 128, torch.bfloat16, "relu", MID.replace(split=16, tma=True)), (90,), "bf16", 64)
    # Every activation in every kernel (the activation code is inlined into each).
    for activation in ACTIVATIONS:
        d = torch.float16
        v[f"forward-fp16-{activation}"] = Variant(forward(1024, 784, 1024, d, activation, SQUARE), (90,), "fp16", 128)
        v[f"backward_input-fp16-{activation}"] = Variant(
            backward_input(1024, 784, 1024, d, activation, SQUARE, store_delta=activation != "identity"),
            (90,), "fp16", 128)
        v[f"backward_weight-fp16-{activation}"] = Variant(
            backward_weight(1024, 784, 1024, d, activation, SQUARE), (90,), "fp16", 128)
    # The FA family's rules, formed in the backward-input kernel's tiles (a 32-deep reduction
    # step keeps B's tile, and Philox's state for brsf, within Ampere's registers), and DFA's projection.
    for mode in ("sign", "magnitude_sign", "random_sign"):
        for name, d in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            v[f"backward_input-{name}-{mode}"] = Variant(
                backward_input(4096, 4096, 4096, d, "relu", SQUARE_FP32, store_delta=True, feedback_mode=mode),
                (90, 80), name, 128)
    v["dfa_delta-bf16-relu"] = Variant(dfa_delta(8192, 16, 8192, torch.bfloat16, "relu", SQUARE), (90, 80), "bf16", 128)
    v["dfa_delta-fp32-gelu-7x10x113"] = Variant(
        dfa_delta(7, 10, 113, torch.float32, "gelu", LaunchConfig(16, 16, 16)), (90,), "fp32", 16)
    # fp32 with IEEE and tf32 dots (the precision follows PyTorch's switch), pointer and TMA.
    f32 = torch.float32
    for tf32 in (False, True):
        for tag, cfg in (("ptr", SQUARE_FP32), ("tma", SQUARE_FP32.replace(tma=True))):
            prec = "tf32" if tf32 else "ieee"
            v[f"forward-fp32-{prec}-{tag}"] = Variant(forward(4096, 4096, 4096, f32, "relu", cfg), (90,), "fp32", 128,
                                                      tf32)
            v[f"backward_input-fp32-{prec}-{tag}"] = Variant(
                backward_input(4096, 4096, 4096, f32, "tanh", cfg, store_delta=True), (90,), "fp32", 128, tf32)
            v[f"backward_weight-fp32-{prec}-{tag}"] = Variant(
                backward_weight(4096, 4096, 4096, f32, "gelu", cfg), (90,), "fp32", 128, tf32)
    # The tutorial's first layer at batch 64 in fp32: the forward's split-K and its epilogue.
    v["forward-fp32-split-64x784x128"] = Variant(
        forward(64, 784, 128, f32, "relu", LaunchConfig(32, 32, 32, split=6)), (90, 80), "fp32", 32)
    # int64 offsets, for real: 2^21 + 1 rows of 1024, and a stride of 2^31.
    v["forward-fp16-int64"] = Variant(forward(2**21 + 1, 1024, 16, torch.float16, "identity", MID), (90,), "fp16", 64)
    v["backward_weight-fp16-int64-nobias"] = Variant(
        backward_weight(64, 1024, 16, torch.float16, "leaky_relu", MID, bias_grad=False, x_strides=(2**31, 1)),
        (90,), "fp16", 64)
    # Odd sizes: nothing divisible by 16, small tiles.
    small = LaunchConfig(16, 16, 16, num_warps=4, num_stages=3)
    v["forward-fp16-7x17x113"] = Variant(forward(7, 17, 113, torch.float16, "gelu", small), (90,), "fp16", 16)
    v["backward_weight-fp16-split-7x17x113"] = Variant(
        backward_weight(7, 17, 113, torch.float16, "relu", small.replace(split=2)), (90,), "fp16", 16)
    return v


def _record(call):
    """The launches ``call()`` makes: (kernel name, positional args, keyword args)."""
    recorded = []
    saved = {}
    for name in fa_linear_kernels.KERNEL_NAMES:
        kernel = getattr(fa_linear_kernels, name)
        saved[name] = kernel.run

        def record(*args, grid, warmup, _name=name, **kwargs):
            recorded.append((_name, args, kwargs))

        kernel.run = record
    try:
        fa_linear.clear_plans()
        call()
    finally:
        for name, run in saved.items():
            getattr(fa_linear_kernels, name).run = run
    return recorded


def _specialise(fn, args, kwargs):
    """(signature, constexprs, attrs) as the JIT builds them for these arguments."""
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        value = bound[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        ty, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        if ty == "constexpr":
            signature[name], constexprs[name] = "constexpr", spec
        else:
            signature[name] = ty
            if spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(spill bytes stored + loaded, registers) from the bundled ptxas -v."""
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([triton.knobs.nvidia.ptxas.path, "-v", f"--gpu-name={gpu}", src,
                               "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    log = done.stdout + done.stderr
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    registers = re.search(r"Used (\d+) registers", log)
    return spills, int(registers.group(1)) if registers else -1


def compile_variant(name: str, variant: Variant, archs=None) -> list[dict]:
    """One row per recorded launch and architecture (see the module docstring)."""
    torch.backends.cuda.matmul.allow_tf32 = variant.tf32
    rows = []
    for kernel, args, kwargs in _record(variant.call):
        fn = getattr(fa_linear_kernels, kernel)
        for arch in archs or variant.archs:
            row = {"variant": name, "kernel": kernel, "arch": arch, "dtype": variant.dtype,
                   "block_rows": variant.block_rows}
            try:
                signature, constexprs, attrs = _specialise(fn, args, kwargs)
                target = GPUTarget("cuda", arch, 32)
                backend = triton.compiler.make_backend(target)
                options = backend.parse_options({"num_warps": kwargs.get("num_warps", 4),
                                                 "num_stages": kwargs.get("num_stages", 3)})
                source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
                compiled = triton.compile(source, target=target, options=options.__dict__)
                ptx = compiled.asm["ptx"]
                spills, registers = _ptxas_report(ptx, arch)
                row.update(ok=True, tensor_core=("wgmma.mma_async" in ptx) if arch >= 90 else ("mma.sync" in ptx),
                           spill_bytes=spills, registers=registers)
            except Exception as err:  # noqa: BLE001 - reported, not raised
                row.update(ok=False, error=f"{type(err).__name__}: {str(err)[-800:]}")
            rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="", help="comma-separated names (default: all)")
    parser.add_argument("--arch", default="", help="only these architectures, e.g. 90")
    parser.add_argument("--list", action="store_true", help="print the variant names and exit")
    args = parser.parse_args(argv)
    if native_specialize_impl is None:
        print(json.dumps({"skip": "this Triton has no native_specialize_impl"}))
        return 0
    variants = _variants()
    if args.list:
        print("\n".join(variants))
        return 0
    names = [n for n in args.variants.split(",") if n] or list(variants)
    only = {int(a) for a in args.arch.split(",") if a}
    for name in names:
        variant = variants[name]
        for row in compile_variant(name, variant, [a for a in variant.archs if not only or a in only]):
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
