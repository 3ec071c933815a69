"""Offline loop guard: facts about the main K-loop of a Triton GEMM kernel compiled for sm_90 (Hopper).

    python -m tests.loop_facts --selftest [--cases a,b] [--list] [--dump DIR]

No GPU is needed: a launch is recorded (meta tensors, the kernel's ``run`` replaced by a
recorder, as tests/compile_kernels.py does), its arguments are specialised as a real launch's,
and Triton's own compiler builds it for sm_90. What Triton and ptxas built is then read:

- TTGIR: the innermost ``scf.for`` holding a dot (``ttng.warp_group_dot``, or ``tt.dot`` for FMA
  dots): where operand A lives, 2-D ``tt.trans``, ``tt.reduce``, how loads are issued;
- PTX: the innermost loop holding ``wgmma.mma_async`` (``mma.sync`` for tiles under 64 rows,
  ``fma.rn.f32`` for FMA dots): cp.async widths, TMA (``cp.async.bulk.tensor``), plain
  ``ld.global`` and ``st.global``;
- SASS (cuobjdump, which ships with Triton): the innermost loop holding ``HGMMA`` (``HMMA``, ``FFMA``):
  instructions per iteration, HGMMAs with A in registers, whether ptxas serialized the wgmma
  chain (a ``WARPGROUP.DEPBAR.LE gsb0, 0x0`` after every HGMMA: what its "wgmma.mma_async
  instructions are serialized" warnings C7511/C7515 announce); registers and local memory
  (spills) from ``cuobjdump -res-usage``.

:func:`loop_flags` names how a loop differs from the Triton tutorial GEMM's
(``fa_triton.kernels.tutorial_gemm``, the yardstick): SER (serialized wgmma), regA (operand A in
registers), T2d (2-D transpose), red (reduction), stg (global store), ldg (plain ld.global
instead of 16-byte cp.async or TMA), cp<16 (narrower cp.async), spill; an empty list is a
tutorial-like loop. On the H200 the tutorial-like loops ran at 74–105% of cuBLAS and the flagged
ones at 19–71% (shared/perf/README.md, section 7): the guard catches gross regressions, it does
not predict times.

For another kernel: ``launches = record_launches(kernel, lambda: launcher(meta tensors...))``,
then ``loop_flags(loop_facts(compile_sm90(kernel, *launches[0])))``.

Compiling needs the real compiler: run this without ``TRITON_INTERPRET=1`` (under it
``@triton.jit`` makes interpreter functions; the test suite starts this module in a subprocess).
Importing it compiles nothing; :func:`loop_flags` and the text parsers work anywhere.
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
import time

import torch
import triton
import triton.language as tl

try:  # Triton's offline compile API (3.6 and 3.8 checked); without it the CLI reports a skip
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - depends on the installation
    native_specialize_impl = None

ARCH = 90
FLAGS = ("SER", "regA", "T2d", "red", "stg", "ldg", "cp<16", "spill")


# ----------------------------------------------------------------------------------- compiling
def interpreted() -> bool:
    """Whether ``@triton.jit`` makes interpreter functions in this process (nothing can compile)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def record_launches(kernel, call) -> list[tuple[tuple, dict]]:
    """[(args, kwargs)] of the launches of ``kernel`` that ``call()`` makes; nothing runs (the
    instance's ``run`` is replaced while ``call`` runs, so launchers must go through ``.run``)."""
    launches = []

    def record(*args, grid, warmup, **kwargs):
        launches.append((args, kwargs))

    saved = vars(kernel).get("run")  # an instance attribute (another recorder), else the class's run
    kernel.run = record
    try:
        call()
    finally:
        if saved is None:
            del kernel.run
        else:
            kernel.run = saved
    return launches


def specialise(fn, args, kwargs) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as the JIT builds them at a launch with these arguments:
    integers equal to 1 become constants, 16-divisible integers and pointers get the hint."""
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", bound[name]
            continue
        ty, spec = native_specialize_impl(BaseBackend, bound[name], False, True, True)
        if ty == "constexpr":
            signature[name], constexprs[name] = "constexpr", spec
        else:
            signature[name] = ty
            if spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def compile_sm90(fn, args, kwargs, arch: int = ARCH):
    """``triton.compile`` of one recorded launch of ``fn`` for sm_90 (or ``arch``), with its
    num_warps and num_stages."""
    if interpreted():
        raise RuntimeError("compiling needs the real compiler: run without TRITON_INTERPRET=1")
    signature, constexprs, attrs = specialise(fn, args, kwargs)
    target = GPUTarget("cuda", arch, 32)
    options = triton.compiler.make_backend(target).parse_options(
        {"num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3)})
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def cuobjdump(cubin: bytes) -> tuple[str, str]:
    """(SASS, resource usage) of a cubin, from the cuobjdump that ships with Triton."""
    tool = os.path.join(os.path.dirname(triton.knobs.nvidia.ptxas.path), "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    return sass, res


# ----------------------------------------------------------------------------------- loops
def innermost_loop(instrs, holds) -> list[str] | None:
    """Texts of the shortest span from a backward branch's target to the branch that holds an
    instruction ``holds`` accepts: the innermost loop around it (None if there is none).
    ``instrs``: [(address or label or None, text, branch target or None)] in program order."""
    where = {addr: i for i, (addr, _, _) in enumerate(instrs) if addr is not None}
    best = None
    for i, (_, _, target) in enumerate(instrs):
        start = where.get(target)
        if start is not None and start < i and (best is None or i - start < best[1] - best[0]):
            if any(holds(text) for _, text, _ in instrs[start:i + 1]):
                best = (start, i)
    return None if best is None else [text for _, text, _ in instrs[best[0]:best[1] + 1] if text]


_TTGIR_DOT = re.compile(r"= (?:ttng\.warp_group_dot|tt\.dot) ")  # wgmma, or an FMA (or pre-Hopper) dot


def ttgir_loop(ttgir: str) -> list[str] | None:
    """Lines of the innermost ``scf.for`` holding a dot. MLIR prints a region's closing brace at
    its op's indentation, which ends the body."""
    lines = ttgir.splitlines()
    best = None
    for i, line in enumerate(lines):
        if " scf.for " not in line:
            continue
        close = " " * (len(line) - len(line.lstrip())) + "}"
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(close)), len(lines))
        body = lines[i + 1:end]
        if any(_TTGIR_DOT.search(b) for b in body) and (best is None or len(body) < len(best)):
            best = body
    return best


def ptx_instructions(ptx: str) -> list[tuple]:
    """[(label, text, branch target)] of a PTX listing (labels as entries of their own)."""
    instrs = []
    for line in ptx.splitlines():
        text = line.split("//")[0].strip()
        if m := re.match(r"(\$L__\w+):", text):
            instrs.append((m[1], "", None))
        elif text and not text.startswith((".", "{", "}")):
            branch = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", text)
            instrs.append((None, text, branch[1] if branch else None))
    return instrs


def sass_instructions(sass: str) -> list[tuple]:
    """[(address, text, branch target address)] of a cuobjdump -sass listing, without the
    instructions predicated on @!PT (never issued: ptxas padding)."""
    instrs, labels = [], {}
    pending = []  # labels (.L_x_N:) waiting for the next instruction's address
    for line in sass.splitlines():
        if m := re.match(r"\s*(\.L_x_\d+):", line):
            pending.append(m[1])
            continue
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+([^;]*);", line)
        if not m:
            continue
        address = int(m[1], 16)
        for label in pending:
            labels[label] = address
        pending = []
        text = m[2].strip()
        if text.startswith("@!PT "):
            continue
        branch = re.search(r"\bBRA\b(?:\.\S+)?\s+(?:`\((\.L_x_\d+)\)|(0x[0-9a-f]+))", text)
        target = None if not branch else branch[1] or int(branch[2], 16)
        instrs.append((address, text, target))
    return [(a, t, labels.get(b, b)) for a, t, b in instrs]


# ----------------------------------------------------------------------------------- facts
def _count(pattern: str, lines) -> int:
    return sum(len(re.findall(pattern, line)) for line in lines or ())


def ttgir_facts(ttgir: str) -> dict:
    """Facts of the TTGIR main loop (see the module docstring)."""
    body = ttgir_loop(ttgir)
    if body is None:
        return {"has_loop": False, "dot_kind": "wgmma" if "ttng.warp_group_dot " in ttgir else
                ("fma" if re.search(r"= tt\.dot ", ttgir) else None)}
    dots = [line for line in body if _TTGIR_DOT.search(line)]
    # "... : A_type * B_type -> C_type": a ranked tensor is in registers, a memdesc in shared
    # memory. Only wgmma can take A from shared memory (FMA dots take both from registers).
    a_types = [line.rsplit(" : ", 1)[-1].split(" * ")[0] for line in dots if "warp_group_dot" in line]
    return {
        "has_loop": True,
        "dot_kind": "wgmma" if any("warp_group_dot" in d for d in dots) else "fma",
        "dots": len(dots),
        "dot_a_in_registers": sum(t.lstrip().startswith("tensor<") for t in a_types),
        "t2d": _count(r"tt\.trans .*order = array<i32: 1, 0>", body),
        "reductions": _count(r'"tt\.reduce"', body),
        "ttgir_loads": {"async_copy": _count(r"ttg\.async_copy_global_to_local ", body),
                        "tma": _count(r"async_tma_copy_global_to_local|tt\.descriptor_load ", body),
                        "tt.load": _count(r"= tt\.load ", body)},
        "waits": [int(w) for w in re.findall(r"warp_group_dot_wait .*pendings = (\d+)", "\n".join(body))],
    }


def ptx_facts(ptx: str, mma: str) -> dict:
    """Facts of the PTX main loop: the innermost loop holding ``mma`` (an instruction prefix)."""
    body = innermost_loop(ptx_instructions(ptx), lambda t: mma in t)
    if body is None:
        return {"ptx_loop": False}
    loads = {}
    for width in re.findall(r"cp\.async\.c[ag]\.shared\.global(?:\.\S+)? \[[^]]*\], \[[^]]*\], (0x[0-9a-f]+|\d+)",
                            "\n".join(body)):
        key = f"cp.async.{int(width, 0)}B"
        loads[key] = loads.get(key, 0) + 1
    if tma := _count(r"cp\.async\.bulk\.tensor", body):
        loads["tma"] = tma
    stores = 0
    for text in body:
        if m := re.match(r"(?:@!?%p\d+\s+)?ld\.global\S*?((?:\.v\d)?\.[bfsu]\d+)\s", text):
            key = "ld.global" + m[1]
            loads[key] = loads.get(key, 0) + 1
        stores += bool(re.match(r"(?:@!?%p\d+\s+)?st\.global", text))
    return {"ptx_loop": True, "ptx_mma": _count(re.escape(mma), body), "operand_loads": loads,
            "global_stores": stores}


def sass_facts(sass: str, res: str, mma: str) -> dict:
    """Facts of the SASS main loop (the innermost loop holding ``mma``, an opcode) and resources."""
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", res)}
    facts = {"registers": usage.get("REG"), "spill_bytes": usage.get("STACK", 0) + usage.get("LOCAL", 0)}
    body = innermost_loop(sass_instructions(sass), lambda t: re.search(rf"\b{mma}\b", t))
    if body is None:
        return dict(facts, sass_loop=False)
    hgmma = [t for t in body if re.search(r"\bHGMMA\.", t)]
    zero_waits = _count(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x0\b", body)
    return dict(facts, sass_loop=True, sass_ops=len(body), sass_mma=_count(rf"\b{mma}\b", body),
                hgmma=len(hgmma),
                reg_a=sum(bool(re.search(r"HGMMA\.\S+ R\d+, R\d+", t)) for t in hgmma),  # A from registers
                serialized=len(hgmma) > 1 and zero_waits >= len(hgmma),
                warpgroup_waits=re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", "\n".join(body)))


def loop_facts(compiled) -> dict:
    """Facts of the main K-loop of one ``triton.compile`` result for sm_90 (module docstring).

    ``has_loop`` is False for a kernel without a dot in a loop (then only ``spill_bytes`` and
    ``registers`` mean something). ``sass_ops``, ``hgmma`` and ``reg_a`` count one iteration
    (the loop body's static count, divided by ptxas's unroll factor where it unrolled);
    ``sass_ops`` is None where no SASS loop holds the MMA."""
    facts = ttgir_facts(compiled.asm["ttgir"])
    if facts["dot_kind"] == "fma" and "mma.sync" in compiled.asm["ptx"]:
        facts["dot_kind"] = "mma"  # tiles under 64 rows: Ampere's mma.sync (HMMA), A from registers
    kind = facts["dot_kind"]
    sass, res = cuobjdump(compiled.asm["cubin"])
    s = sass_facts(sass, res, {"wgmma": "HGMMA", "mma": "HMMA"}.get(kind, "FFMA"))
    facts.update(registers=s["registers"], spill_bytes=s["spill_bytes"], smem_bytes=compiled.metadata.shared,
                 num_warps=compiled.metadata.num_warps)
    if not facts["has_loop"]:
        return facts
    p = ptx_facts(compiled.asm["ptx"], {"wgmma": "wgmma.mma_async", "mma": "mma.sync"}.get(kind, "fma.rn.f32"))
    # No PTX loop around the MMA (e.g. LLVM unrolled a short constant trip count): nothing to read.
    facts.update(ptx_loop=p["ptx_loop"], operand_loads=p.get("operand_loads", {}),
                 global_stores=p.get("global_stores", 0))
    if s["sass_loop"]:
        # ptxas may unroll the loop: the SASS loop then holds a multiple of the PTX loop's MMAs.
        unroll = s["sass_mma"] // p["ptx_mma"] if p.get("ptx_mma") and s["sass_mma"] % p["ptx_mma"] == 0 else 1
        unroll = max(unroll, 1)
        facts.update(sass_ops=s["sass_ops"] // unroll, sass_unroll=unroll, hgmma=s["hgmma"] // unroll,
                     reg_a=s["reg_a"] // unroll, serialized=s["serialized"], warpgroup_waits=s["warpgroup_waits"])
    else:
        facts.update(sass_ops=None, sass_unroll=None, hgmma=0, reg_a=0, serialized=False, warpgroup_waits=[])
    return facts


def loop_flags(facts: dict) -> list[str]:
    """How the main loop differs from the tutorial GEMM's (module docstring); [] = tutorial-like."""
    flags = []
    if not facts.get("has_loop"):
        return ["spill"] if facts.get("spill_bytes") else []
    loads = facts.get("operand_loads", {})
    flags += ["SER"] * bool(facts.get("serialized"))
    flags += ["regA"] * bool(facts.get("reg_a") or facts.get("dot_a_in_registers"))
    flags += ["T2d"] * bool(facts.get("t2d"))
    flags += ["red"] * bool(facts.get("reductions"))
    flags += ["stg"] * bool(facts.get("global_stores"))
    flags += ["ldg"] * any(k.startswith("ld.global") for k in loads)
    flags += ["cp<16"] * any(re.fullmatch(r"cp\.async\.(\d+)B", k) and int(k[9:-1]) < 16 for k in loads)
    flags += ["spill"] * bool(facts.get("spill_bytes"))
    return flags


# ----------------------------------------------------------------------------------- selftest
@triton.jit
def faulty_matmul_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr, x_ptr,
    # sizes
    M, N, K,
    # strides
    stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_cm, stride_cn,
    # flags
    FAULT: tl.constexpr,
    # blocks
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The tutorial GEMM (no tile grouping, no K mask: K is a multiple of BLOCK_K) with one
    deliberate fault in its K-loop, chosen by FAULT; x is an extra [M, K] tensor with a's strides:

    - "reduce": row sums of a, a tl.sum in the loop (stored after it);
    - "scale_a": a ⊙ x before the dot, so operand A is formed in registers;
    - "store": each a tile is copied to x, a global store in the loop;
    - "trans": the A tile is xᵀ's, transposed in registers after a scaling (a 2-D tt.trans).
    """
    pid_m = tl.program_id(0) // tl.cdiv(N, BLOCK_N)
    pid_n = tl.program_id(0) % tl.cdiv(N, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    x_ptrs = x_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    xt_ptrs = x_ptr + offs_k[:, None] * stride_am + offs_m[None, :] * stride_ak  # [BLOCK_K, BLOCK_M] of x
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_sums = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for _ in range(0, K // BLOCK_K):
        a = tl.load(a_ptrs)
        if FAULT == "reduce":
            row_sums += tl.sum(a.to(tl.float32), axis=1)
        elif FAULT == "scale_a":
            a = a * tl.load(x_ptrs)
        elif FAULT == "store":
            tl.store(x_ptrs, a)
        elif FAULT == "trans":
            a = tl.trans(tl.load(xt_ptrs) * 2.0)
        acc = tl.dot(a, tl.load(b_ptrs), acc)
        a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_ak
        xt_ptrs += BLOCK_K * stride_am
        b_ptrs += BLOCK_K * stride_bk
    if FAULT == "reduce":
        acc += row_sums[:, None]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty))


@triton.jit
def scale_kernel(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr):
    """y = scale·x: no dot, no loop (has_loop is False)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * scale, mask=offs < n)


@dataclasses.dataclass(frozen=True)
class Case:
    """One kernel of the selftest: a thunk returning (JITFunction, args, kwargs) and what its
    loop must show: ``flags`` exactly (``exact``) or at least those (None: nothing expected)."""

    launch: object
    flags: tuple | None = ()
    exact: bool = True
    has_loop: bool = True
    note: str = ""


S = 8192  # the tutorial's benchmark size: M = N = K
LAYOUTS = {"NN": ((S, 1), (S, 1)), "TN": ((1, S), (S, 1)), "NT": ((S, 1), (1, S))}  # strides of a, b
TILES = {"128x256x64-w8s3": dict(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
         "128x128x64-w8s4": dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4)}


def _meta(rows, cols, strides=None, dtype=torch.bfloat16):
    return torch.empty_strided((rows, cols), strides or (cols, 1), device="meta", dtype=dtype)


def _tutorial(a, b, **config):
    def launch():
        from fa_triton.kernels import tutorial_gemm

        fn = tutorial_gemm.tutorial_matmul_kernel
        (args, kwargs), = record_launches(fn, lambda: tutorial_gemm.tutorial_matmul(a(), b(), **config))
        return fn, args, kwargs
    return launch


def _faulty(fault, dtype=torch.bfloat16, block=(128, 128, 64), num_warps=8, num_stages=3):
    def launch():
        a, b, c, x = _meta(S, S, dtype=dtype), _meta(S, S, dtype=dtype), _meta(S, S, dtype=dtype), _meta(S, S)
        args = (a, b, c, x, S, S, S, S, 1, S, 1, S, 1)
        return faulty_matmul_kernel, args, dict(FAULT=fault, BLOCK_M=block[0], BLOCK_N=block[1], BLOCK_K=block[2],
                                                num_warps=num_warps, num_stages=num_stages)
    return launch


def _elementwise():
    return scale_kernel, (_meta(S, S), _meta(S, S), S * S, 0.5), dict(BLOCK=1024, num_warps=4, num_stages=3)


def ptxas_release() -> tuple[int, ...]:
    """The version of the ptxas Triton uses (e.g. (12, 9)); () where it cannot be read."""
    version = getattr(triton.knobs.nvidia.ptxas, "version", None) or ""
    return tuple(int(n) for n in re.findall(r"\d+", str(version))[:2])


def selftest_cases() -> dict[str, Case]:
    """The tutorial in its three layouts and two Hopper tiles (tutorial-like by definition), and
    kernels whose loops are deliberately unlike it, each with the flag it must get."""
    cases = {}
    # ptxas 12.8 (Triton 3.6) serializes the NT 128x256 tutorial loop (C7515: non-wgmma
    # instructions define accumulator registers); on the H200 that tile ran at 79% of cuBLAS where
    # NN and TN reached 101-105%. ptxas 12.9 (Triton 3.8) does not.
    old_ptxas = ptxas_release() < (12, 9)
    for layout, (sa, sb) in LAYOUTS.items():
        for tile, config in TILES.items():
            serialized = old_ptxas and layout == "NT" and tile.startswith("128x256")
            cases[f"tutorial-{layout}-bf16-{tile}"] = Case(
                _tutorial(lambda sa=sa: _meta(S, S, sa), lambda sb=sb: _meta(S, S, sb), **config),
                ("SER",) if serialized else (), note="ptxas < 12.9 serializes this loop" if serialized else "")
    # Rows not 16-byte aligned: bf16 operands arrive by 2-byte ld.global, fp32 by 4-byte cp.async.
    odd = S - 1
    cases["tutorial-NN-bf16-odd-strides"] = Case(
        _tutorial(lambda: _meta(odd, odd), lambda: _meta(odd, odd), **TILES["128x128x64-w8s4"]), ("ldg",), False)
    fp32 = dict(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=3)
    cases["tutorial-NN-fp32-tf32-odd-strides"] = Case(
        _tutorial(lambda: _meta(odd, odd, dtype=torch.float32), lambda: _meta(odd, odd, dtype=torch.float32),
                  **fp32), ("cp<16",), False)
    # IEEE fp32: an FMA dot, no tensor cores (facts shown, nothing expected).
    cases["tutorial-NN-fp32-ieee-fma"] = Case(
        _tutorial(lambda: _meta(S, S, dtype=torch.float32), lambda: _meta(S, S, dtype=torch.float32),
                  block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=3, input_precision="ieee"), None)
    # A 256x128 fp32 accumulator over 4 warps is 256 registers a thread: spills (and ptxas then
    # serializes the wgmma chain, C7511).
    cases["tutorial-NN-bf16-256x128x64-w4s3-spill"] = Case(
        _tutorial(lambda: _meta(S, S), lambda: _meta(S, S), block_m=256, block_n=128, block_k=64, num_warps=4,
                  num_stages=3), ("spill",), False)
    for fault, flag in (("reduce", "red"), ("scale_a", "regA"), ("store", "stg"), ("trans", "T2d")):
        cases[f"faulty-{fault}"] = Case(_faulty(fault), (flag,), False)
    cases["elementwise-no-loop"] = Case(_elementwise, (), has_loop=False)
    return cases


def run_case(name: str, case: Case, dump: str | None = None) -> dict:
    """One JSON-able row: the case's facts and flags, and the seconds its compile took."""
    fn, args, kwargs = case.launch()
    start = time.perf_counter()
    compiled = compile_sm90(fn, args, kwargs)
    facts = loop_facts(compiled)
    row = {"case": name, "kernel": fn.__name__, "seconds": round(time.perf_counter() - start, 2), **facts,
           "flags": loop_flags(facts), "expected_flags": None if case.flags is None else list(case.flags),
           "exact": case.exact, "expected_has_loop": case.has_loop, "note": case.note}
    if dump:  # the kernel's TTGIR, PTX and SASS, for reading
        os.makedirs(dump, exist_ok=True)
        for ext, text in (("ttgir", compiled.asm["ttgir"]), ("ptx", compiled.asm["ptx"]),
                          ("sass", cuobjdump(compiled.asm["cubin"])[0])):
            with open(os.path.join(dump, f"{name}.{ext}"), "w") as f:
                f.write(text)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--selftest", action="store_true", help="compile the selftest kernels, one JSON line each")
    parser.add_argument("--cases", default="", help="comma-separated selftest case names (default: all)")
    parser.add_argument("--list", action="store_true", help="print the selftest case names and exit")
    parser.add_argument("--dump", help="write each kernel's TTGIR, PTX and SASS into this folder")
    args = parser.parse_args(argv)
    if native_specialize_impl is None:
        print(json.dumps({"skip": f"Triton {triton.__version__} has no offline compile API"}))
        return 0
    cases = selftest_cases()
    if args.list:
        print("\n".join(cases))
        return 0
    if not args.selftest:
        parser.error("nothing to do: pass --selftest or --list")
    if interpreted():
        sys.exit("tests.loop_facts compiles for a GPU: run it without TRITON_INTERPRET=1")
    for name in [n for n in args.cases.split(",") if n] or list(cases):
        print(json.dumps(run_case(name, cases[name], args.dump)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
