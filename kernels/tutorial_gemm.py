"""The plain Triton GEMM of Triton's tutorial 03 (matrix multiplication): the project's yardstick.

It is what fa_triton's kernels are measured against, twice:

- the offline loop guard (``tests/loop_facts.py``) compiles it for sm_90 and asserts that the
  main K-loop of every GEMM kernel looks like this one's (one wgmma chain fed from shared memory
  by 16-byte cp.async or TMA, nothing serialized, transposed, reduced or stored in the loop);
- the GPU benchmarks run it beside cuBLAS as the speed a plain Triton GEMM reaches on the
  same layout and tile.

So it stays the tutorial's kernel: grouped tile ordering, rows and columns wrapped modulo M and N
(loads need no row or column mask; the store is masked), a K mask on every step, an fp32
accumulator, the result cast to c's dtype. Nothing of the layer's (bias, activation, int64
offsets, split-K, TMA) is added, and it has its own copy of the tile ordering, so that edits to
the layer's helpers do not move the yardstick.

``tutorial_matmul(a, b)`` computes a @ b for 2-D tensors of any strides: ``tutorial_matmul(d.t(), x)``
is the TN layout (a backward-weight GEMM), ``tutorial_matmul(x, w.t())`` the NT layout (a forward
GEMM). Importing this module compiles nothing and touches no GPU; with ``TRITON_INTERPRET=1`` set
before import it runs on CPU tensors through Triton's interpreter.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["tutorial_matmul", "tutorial_matmul_kernel"]


@triton.jit
def tutorial_matmul_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr,
    # sizes
    M, N, K,
    # strides
    stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_cm, stride_cn,
    # flags
    INPUT_PRECISION: tl.constexpr,
    # blocks
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c[M, N] = a[M, K] @ b[K, N], one [BLOCK_M, BLOCK_N] tile of c per program (1-D grid)."""
    # Grouped ordering: consecutive programs walk down a band of GROUP_M tile rows, column by
    # column, so the a rows and b columns they read are reused from L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    band_tiles = GROUP_M * tiles_n
    band_first_row = (pid // band_tiles) * GROUP_M
    band_rows = min(tiles_m - band_first_row, GROUP_M)  # the last band may be shorter
    pid_m = band_first_row + (pid % band_tiles) % band_rows
    pid_n = (pid % band_tiles) // band_rows

    # Rows and columns past M and N wrap around (they read valid memory and are never stored).
    offs_am = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_bn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        # Only the last step can run past K: its missing elements load as 0 and add nothing.
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + offs_cm[:, None] * stride_cm + offs_cn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_cm[:, None] < M) & (offs_cn[None, :] < N))


def tutorial_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, *, block_m: int = 128,
                    block_n: int = 128, block_k: int = 64, group_m: int = 8, num_warps: int = 8, num_stages: int = 3,
                    input_precision: str = "tf32") -> torch.Tensor:
    """c = a @ b for a [M, K] and b [K, N] of one dtype and any strides; c [M, N] in a's dtype
    (or ``out``, any strides). ``input_precision`` applies to fp32 dots ("tf32", "tf32x3", "ieee").

    Launches through ``tutorial_matmul_kernel.run`` so that a recorder put in place of the
    kernel's ``run`` captures the launch without running it (meta tensors work then).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"tutorial_matmul needs a [M, K] and b [K, N], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"tutorial_matmul needs one dtype, got {a.dtype} and {b.dtype}")
    M, K = a.shape
    N = b.shape[1]
    if out is None:
        out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    elif out.shape != (M, N):
        raise ValueError(f"out must be [{M}, {N}], got {tuple(out.shape)}")
    if M == 0 or N == 0:
        return out  # nothing to store (and `% M` would divide by zero)
    # The tutorial's offsets are int32: refuse what would overflow them rather than read wrong memory.
    for t in (a, b, out):
        if sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) >= 2**31:
            raise ValueError("tutorial_matmul computes int32 offsets: an operand spans 2^31 elements or more")
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    meta = dict(INPUT_PRECISION=input_precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
                num_warps=num_warps, num_stages=num_stages)
    # Triton launches on the current CUDA device: make it a's.
    with torch.cuda.device(a.device) if a.is_cuda else contextlib.nullcontext():
        tutorial_matmul_kernel.run(a, b, out, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                                   out.stride(0), out.stride(1), grid=grid, warmup=False, **meta)
    return out
