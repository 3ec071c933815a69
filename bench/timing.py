"""Timers: p50/p20/p80 milliseconds of one call, and the machine's own ceilings.

On a GPU, single calls are timed with ``triton.testing.do_bench`` (warm-up, L2 flushed before
each call, median and quantiles of per-call CUDA-event times). A training loop is launch-bound
at small batches, and do_bench's flush would hide the host's launch cost behind the flush
kernel; so ``loop_timing`` calls are timed back to back, as a training loop runs them
(CUDA events around batches of iterations, no flush, inputs rotated by the callable).
On the CPU both are wall-clock loops.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch

QUANTILES = (0.5, 0.2, 0.8)


@contextmanager
def matmul_precision(tf32: bool):
    """Allow or forbid tf32 for float32 matmuls (cuBLAS and fa_triton's kernels follow it)."""
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9: reading allow_tf32 raises once fp32_precision (the newer switch) is set.
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    previous = getattr(matmul, name)
    setattr(matmul, name, ("tf32" if tf32 else "ieee") if name == "fp32_precision" else tf32)
    try:
        yield
    finally:
        setattr(matmul, name, previous)


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    cuts = statistics.quantiles(samples, n=10, method="inclusive")  # deciles: cuts[1] = p20, cuts[7] = p80
    return statistics.median(samples), cuts[1], cuts[7]


def time_cpu(fn, reset=None, *, warmup_ms: float = 25, rep_ms: float = 100, max_samples: int = 200):
    """(p50, p20, p80) ms of one call of `fn` by wall clock; `reset()` runs before each call, untimed."""
    def once() -> float:
        if reset is not None:
            reset()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    once()  # compiles, caches, allocations
    deadline = time.perf_counter() + warmup_ms / 1e3
    while time.perf_counter() < deadline:
        once()
    samples = [once()]
    budget = max(rep_ms - samples[0], 0)
    n = max(2, min(max_samples, int(budget / max(samples[0], 1e-3))))
    samples += [once() for _ in range(n)]
    return _quantiles(samples)


def time_cuda(fn, reset_tensors=None, *, warmup_ms: float = 25, rep_ms: float = 100):
    """(p50, p20, p80) ms of one call of `fn` with triton.testing.do_bench."""
    from triton.testing import do_bench

    fn()  # compile, autotune and allocate outside the timing
    torch.cuda.synchronize()
    result = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=reset_tensors or None,
                      quantiles=list(QUANTILES))
    return tuple(float(v) for v in result)


def time_cuda_loop(fn, *, warmup_ms: float = 25, rep_ms: float = 100, samples: int = 10):
    """(p50, p20, p80) ms per iteration of back-to-back calls (host launch cost included)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    per_sample = max(1, int(rep_ms / samples / estimate))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(samples)]
    for begin, finish in events:
        begin.record()
        for _ in range(per_sample):
            fn()
        finish.record()
    torch.cuda.synchronize()
    return _quantiles([b.elapsed_time(f) / per_sample for b, f in events])


def time_bench(bench, device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100):
    """Time a ``cases.Bench`` on `device` with the timer its kind needs."""
    if device.type == "cuda":
        if bench.loop_timing:
            return time_cuda_loop(bench.fn, warmup_ms=warmup_ms, rep_ms=rep_ms)
        return time_cuda(bench.fn, bench.grad_to_none, warmup_ms=warmup_ms, rep_ms=rep_ms)
    return time_cpu(bench.fn, bench.reset, warmup_ms=warmup_ms, rep_ms=rep_ms)


# ----------------------------------------------------------------------------- ceilings

def peak_matmul(dtype: torch.dtype, device: torch.device, size: int, **timer) -> tuple[tuple, float]:
    """Times ``torch.mm`` of two [size, size] matrices: ((p50, p20, p80) ms, FLOPs)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    fn = lambda: torch.mm(a, b)  # noqa: E731
    times = time_cuda(fn, **timer) if device.type == "cuda" else time_cpu(fn, **timer)
    return times, 2.0 * size**3


def peak_copy(device: torch.device, nbytes: int, **timer) -> tuple[tuple, float]:
    """Times a device-to-device copy of `nbytes`: ((p50, p20, p80) ms, bytes moved = read + write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    times = time_cuda(fn, **timer) if device.type == "cuda" else time_cpu(fn, **timer)
    return times, 2.0 * nbytes
