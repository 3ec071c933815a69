"""The offline loop guard (``tests/loop_facts.py``) and its yardstick, the tutorial GEMM
(``fa_triton.kernels.tutorial_gemm``).

The guard reads the main K-loop of a kernel compiled for sm_90 from its TTGIR, PTX and SASS and
names how it differs from the tutorial's. Here it must find the tutorial's own loops (three
layouts, two Hopper tiles) tutorial-like and of a plausible length, and give each deliberately
bad kernel its flag. Compiling needs Triton's real compiler, so the selftest runs in
subprocesses without TRITON_INTERPRET (this process has it set when there is no GPU); the
tutorial's arithmetic is checked here, on the kernel device, against a float64 matmul.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fa_triton.kernels.tutorial_gemm import tutorial_matmul
from tests import loop_facts

ROOT = Path(__file__).resolve().parents[1]
WORKERS = 2  # the CI machine's cores
TUTORIAL = [f"tutorial-{layout}-bf16-{tile}" for layout in loop_facts.LAYOUTS for tile in loop_facts.TILES]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "tests.loop_facts", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def selftest() -> dict[str, dict]:
    """Every selftest case's row (facts, flags, what is expected), compiled by WORKERS subprocesses."""
    if loop_facts.native_specialize_impl is None:
        pytest.skip("this Triton has no offline compile API (native_specialize_impl, GPUTarget, ASTSource)")
    names = list(loop_facts.selftest_cases())  # building the cases compiles nothing
    chunks = [",".join(names[i::WORKERS]) for i in range(WORKERS)]
    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(lambda chunk: _run(["--selftest", "--cases", chunk]), chunks))
    rows = {}
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
        rows.update((row["case"], row) for row in map(json.loads, result.stdout.splitlines()))
    assert set(rows) == set(names)
    return rows


def test_tutorial_loops_are_tutorial_like(selftest):
    assert set(TUTORIAL) <= set(selftest)
    for name in TUTORIAL:
        row = selftest[name]
        # [] everywhere except where the ptxas in use is known to serialize (the row's note).
        assert row["flags"] == row["expected_flags"], (name, row["flags"], row["note"])
        assert row["has_loop"] and row["dot_kind"] == "wgmma" and row["hgmma"] >= 4, (name, row)
        assert 60 <= row["sass_ops"] <= 160, (name, row["sass_ops"])
        assert set(row["operand_loads"]) == {"cp.async.16B"}, (name, row["operand_loads"])
        assert row["spill_bytes"] == 0 and 0 < row["registers"] <= 255, (name, row)


def test_every_bad_kernel_gets_its_flag(selftest):
    checked = 0
    for name, row in selftest.items():
        if row["expected_flags"] is None or name in TUTORIAL:
            continue
        if row["exact"]:
            assert row["flags"] == row["expected_flags"], (name, row["flags"])
        else:
            assert set(row["expected_flags"]) <= set(row["flags"]), (name, row["flags"], row["expected_flags"])
        checked += bool(row["expected_flags"])
    assert checked >= 7  # spill, red, regA, stg, T2d, ldg, cp<16
    assert not selftest["elementwise-no-loop"]["has_loop"]
    assert selftest["elementwise-no-loop"]["registers"] > 0


def test_fma_dot_loop_is_found(selftest):
    row = selftest["tutorial-NN-fp32-ieee-fma"]
    assert row["has_loop"] and row["dot_kind"] == "fma" and row["hgmma"] == 0
    # 64x64 outputs over 128 threads, 32 deep: 1024 FFMAs an iteration, plus the rest.
    assert 1024 <= row["sass_ops"] <= 2048, row["sass_ops"]
    assert "regA" not in row["flags"]  # both FMA operands are in registers by nature


# ----------------------------------------------------------------------------------- parsers


def test_loop_flags():
    tutorial = dict(has_loop=True, serialized=False, reg_a=0, dot_a_in_registers=0, t2d=0, reductions=0,
                    global_stores=0, operand_loads={"cp.async.16B": 8, "tma": 2}, spill_bytes=0)
    assert loop_facts.loop_flags(tutorial) == []
    worst = dict(tutorial, serialized=True, reg_a=4, t2d=1, reductions=2, global_stores=4, spill_bytes=16,
                 operand_loads={"cp.async.4B": 8, "ld.global.v4.b32": 2})
    assert loop_facts.loop_flags(worst) == list(loop_facts.FLAGS)
    assert loop_facts.loop_flags({"has_loop": False, "spill_bytes": 8}) == ["spill"]


SASS = """
        /*0100*/                   MOV R1, R2 ;                                   /* 0x0000000200017202 */
.L_x_1:
        /*0110*/                   WARPGROUP.ARRIVE ;                             /* 0x00000000000079c5 */
        /*0120*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;  /* 0x03e00000081879f0 */
        /*0130*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;                /* 0x00008000000079c5 */
        /*0140*/                   HGMMA.64x128x16.F32.BF16 R24, R40, gdesc[UR8], R24, gsb0 ;  /* 0x03e000 */
        /*0150*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;                /* 0x00008000000079c5 */
        /*0160*/              @!PT LDS RZ, [RZ] ;                                 /* 0x00000000ff00798c */
        /*0170*/               @P1 BRA `(.L_x_1) ;                                /* 0xfffffff8002c1947 */
        /*0180*/                   EXIT ;                                         /* 0x000000000000794d */
        /*0190*/                   BRA 0x190;                                     /* 0xfffffffc00fc7947 */
"""


def test_sass_loop_parsing():
    instrs = loop_facts.sass_instructions(SASS)
    assert all("@!PT" not in text for _, text, _ in instrs)  # never issued: not counted
    facts = loop_facts.sass_facts(SASS, "REG:168 STACK:8 SHARED:0 LOCAL:4", "HGMMA")
    assert facts["sass_ops"] == 6 and facts["hgmma"] == 2 and facts["reg_a"] == 1 and facts["serialized"]
    assert facts["registers"] == 168 and facts["spill_bytes"] == 12


def test_innermost_loop_holding_the_mma():
    # outer loop 0..7 around an inner loop 2..4 without the MMA, the MMA at 5: the outer one is the K-loop
    instrs = [(i, f"op{i}", None) for i in range(8)]
    instrs[5] = (5, "MMA", None)
    instrs[4] = (4, "bra", 2)
    instrs[7] = (7, "bra", 0)
    assert loop_facts.innermost_loop(instrs, lambda t: t == "MMA") == [f"op{i}" if i != 5 else "MMA"
                                                                       for i in range(4)] + ["bra", "MMA", "op6", "bra"]
    assert loop_facts.innermost_loop(instrs[:7], lambda t: t == "MMA") is None


# ----------------------------------------------------------------------------------- the tutorial GEMM


def _operands(layout, M, N, K, dtype, device):
    """a [M, K] and b [K, N] in the layout's storage: TN reads a through dᵀ, NT b through wᵀ."""
    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float32).to(device=device, dtype=dtype)
    a = rand(K, M).t() if layout == "TN" else rand(M, K)
    b = rand(N, K).t() if layout == "NT" else rand(K, N)
    return a, b


def _check(c, a, b):
    """|c - a@b| within the fp32 accumulation of K products and the rounding of c to its dtype."""
    ref = a.double() @ b.double()
    K = a.shape[1]
    accumulation = 8 * 2.0**-24 * K**0.5 * (a.double().abs() @ b.double().abs())
    rounding = torch.finfo(c.dtype).eps * ref.abs()
    err = (c.double() - ref).abs()
    assert c.shape == ref.shape and c.dtype == a.dtype
    assert (err <= accumulation + rounding + 1e-30).all(), (err.max().item(), (accumulation + rounding).max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["NN", "TN", "NT"])
@pytest.mark.parametrize("M,N,K", [(7, 17, 113), (1, 1, 1), (130, 70, 200)])
def test_tutorial_matmul_matches_float64(kernel_device, layout, dtype, M, N, K):
    torch.manual_seed(M * 10007 + N * 101 + K)
    a, b = _operands(layout, M, N, K, dtype, kernel_device)
    # fp32 with IEEE dots (the interpreter has no tf32; on a GPU tf32 would miss this bound)
    _check(tutorial_matmul(a, b, input_precision="ieee").cpu(), a.cpu(), b.cpu())


def test_tutorial_matmul_small_tiles_strided_out(kernel_device):
    """Many tiles in short groups (the grouped ordering's last band is partial) into a
    transposed output."""
    torch.manual_seed(0)
    a, b = _operands("NN", 70, 50, 40, torch.float16, kernel_device)
    out = torch.empty(50, 70, dtype=torch.float16, device=kernel_device).t()
    c = tutorial_matmul(a, b, out, block_m=16, block_n=16, block_k=16, group_m=3, num_warps=4, num_stages=2)
    assert c is out
    _check(c.cpu(), a.cpu(), b.cpu())


def test_tutorial_matmul_edge_cases(kernel_device):
    a = torch.zeros(4, 8, device=kernel_device)
    with pytest.raises(ValueError, match="needs a"):
        tutorial_matmul(a, torch.zeros(4, 8, device=kernel_device))
    with pytest.raises(ValueError, match="one dtype"):
        tutorial_matmul(a, torch.zeros(8, 4, dtype=torch.float16, device=kernel_device))
    huge = torch.empty_strided((2, 8), (2**31, 1), device="meta")  # checked before any launch
    with pytest.raises(ValueError, match="int32"):
        tutorial_matmul(huge, torch.empty(8, 4, device="meta"))
    assert tutorial_matmul(torch.zeros(0, 8), torch.zeros(8, 4)).shape == (0, 4)
    ones = torch.ones(3, 0, device=kernel_device)  # K = 0: an empty sum
    assert torch.equal(tutorial_matmul(ones, ones.t().contiguous()).cpu(), torch.zeros(3, 3))
