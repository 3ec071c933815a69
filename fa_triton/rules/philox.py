"""Philox-4x32 in PyTorch, bitwise Triton's ``tl.rand``: brsf's random magnitudes |R|, drawn
the same way by the kernels and by the reference backend (and checked against Triton's own
generator by the tests)."""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32 bits of a·b for a, b < 2³²: the int64 product wraps modulo 2⁶⁴ (two's
    complement), which keeps both halves exact; the high half is masked after the arithmetic
    shift."""
    product = a * b
    return (product >> 32) & _MASK32, product & _MASK32


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """float32 in [0, 1), bitwise what Triton's ``tl.rand(seed, offsets)`` gives for int64 offsets.

    Philox-4x32 with 10 rounds on counter (offset low, offset high, 0, 0) and key (seed low,
    seed high), then Triton's int32-to-uniform conversion. Integer arithmetic in int64 tensors;
    the last step is one int-to-float conversion and one fp32 multiply, as in the kernel.
    """
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        high_2, low_2 = _mul32(c2, 0xCD9E8D57)
        high_0, low_0 = _mul32(c0, 0xD2511F53)
        c0 = high_2 ^ c1 ^ k0
        c2 = high_0 ^ c3 ^ k1
        c1, c3 = low_2, low_0
        k0 = (k0 + 0x9E3779B9) & _MASK32
        k1 = (k1 + 0xBB67AE85) & _MASK32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # the bits as int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=offsets.device)
