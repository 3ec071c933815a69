"""Philox-4x32 in PyTorch, bitwise Triton's ``tl.rand``: brsf's random magnitudes |R|, drawn
the same way by the kernels and by the reference backend (and checked against Triton's own
generator by the tests)."""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """float32 in [0, 1), bitwise what Triton's ``tl.rand(seed, offsets)`` gives for int64 offsets.

    Philox-4x32 with 10 rounds on counter (offset low, offset high, 0, 0) and key (seed low,
    seed high), then Triton's int32-to-uniform conversion. Integer arithmetic in int64 tensors:
    a 32-bit word times a 32-bit constant wraps modulo 2⁶⁴ (two's complement), which keeps both
    halves of the product exact. In place on six buffers (no allocation per step: on the CPU a
    fresh tensor of this size costs its page faults), and the low halves are left unmasked (each
    is only ever XORed into a word whose upper bits are cleared after). The last step is one
    int-to-float conversion and one fp32 multiply, as in the kernel.
    """
    offsets = offsets.to(torch.int64)  # (int32 offsets would wrap in the products below)
    c0 = offsets & _MASK32
    c1 = offsets >> 32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    product_0, product_2 = torch.empty_like(c0), torch.empty_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(9):
        torch.mul(c0, 0xD2511F53, out=product_0)
        torch.mul(c2, 0xCD9E8D57, out=product_2)
        # c2 = hi(c0·A) ^ c3 ^ k1 and c0 = hi(c2·B) ^ c1 ^ k0, the upper 32 bits (the arithmetic
        # shift's sign copies, and any of c1, c3) cleared last.
        torch.bitwise_right_shift(product_0, 32, out=c2).bitwise_xor_(c3).bitwise_xor_(k1).bitwise_and_(_MASK32)
        torch.bitwise_right_shift(product_2, 32, out=c0).bitwise_xor_(c1).bitwise_xor_(k0).bitwise_and_(_MASK32)
        # c1 = lo(c2·B), c3 = lo(c0·A); the old c1, c3 buffers hold the next products.
        c1, c3, product_0, product_2 = product_2, product_0, c1, c3
        k0 = (k0 + 0x9E3779B9) & _MASK32
        k1 = (k1 + 0xBB67AE85) & _MASK32
    # The tenth round: only c0 is read.
    torch.mul(c2, 0xCD9E8D57, out=product_2)
    torch.bitwise_right_shift(product_2, 32, out=c0).bitwise_xor_(c1).bitwise_xor_(k0).bitwise_and_(_MASK32)
    # The bits as int32, x, then -x - 1 where x < 0: for c0 >= 2³¹ that is 2³² - 1 - c0 = c0 ^ (2³² - 1).
    c0.bitwise_xor_(torch.bitwise_right_shift(c0, 31, out=c2).mul_(_MASK32))
    return c0.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=offsets.device)
