"""Memory of one FA layer's forward + backward: fa_triton's kernels against the PyTorch reference.

    python -m bench.memory                 # a GPU: the target shapes
    python -m bench.memory --dry-run       # the CPU: small shapes (saved-tensor bytes only)

Two figures per provider, on the same inputs:

- ``saved_bytes``: what autograd keeps between forward and backward (every tensor the layer
  saves, counted once through ``torch.autograd.graph.saved_tensors_hooks``) — the activation
  memory a network pays per layer, on any device;
- ``peak_bytes`` (CUDA only): the peak of allocated memory during forward + backward above
  what the inputs and parameters already hold (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

SHAPES = ((8192, 8192, 8192, "relu", "bf16"), (4096, 4096, 4096, "relu", "bf16"),
          (8192, 784, 128, "relu", "fp32"), (8192, 128, 64, "relu", "fp32"), (8192, 64, 10, "identity", "fp32"),
          (4096, 1024, 1024, "gelu", "bf16"))
DRY_SHAPES = ((48, 40, 24, "relu", "fp32"), (33, 16, 20, "gelu", "fp16"))


def _saved_and_peak(forward, grad_y, device: str, owned) -> tuple[int, int | None]:
    """(bytes autograd saves for ``forward()``'s backward, beyond the tensors in ``owned``;
    on CUDA the peak allocated during forward + backward above what was allocated before)."""
    import torch

    seen = {}

    def pack(t):
        seen.setdefault((t.data_ptr(), t.dtype, tuple(t.shape)), t.numel() * t.element_size())
        return t

    forward().backward(grad_y)  # compile, tune and allocate outside the measurement
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward()
    y.backward(grad_y)
    del y
    peak = None
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    # Inputs and parameters saved for backward are not new memory: count only what the layer made.
    owned = {t.data_ptr() for t in owned if t is not None}
    return sum(size for (ptr, _, _), size in seen.items() if ptr not in owned), peak


def measure(M, K, N, activation, dtype_name, device, backend):
    """{'saved_bytes': …, 'peak_bytes': … or None} of one forward + backward."""
    import torch

    import fa_triton

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    layer = fa_triton.FALinear(K, N, activation=activation, backend=backend, device=device, dtype=dtype)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(M, N, device=device, dtype=dtype)
    saved, peak = _saved_and_peak(lambda: layer(x), grad_y, device, [x, *layer.parameters(), *layer.buffers()])
    return {"saved_bytes": saved, "peak_bytes": peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU (Triton's interpreter), small shapes")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: measure no new shape after this (bench/gpu_check.sh's time box)")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.memory needs a CUDA GPU (or --dry-run)")
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreter)"
    print(f"FA layer forward + backward memory | {where} | torch {torch.__version__}")
    print(f"{'layer':28s} {'dtype':5s} {'provider':9s} {'saved KiB':>10s} {'peak KiB':>10s} {'peak x ref':>10s}")
    started = time.monotonic()
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    for i, (M, K, N, activation, dtype) in enumerate(shapes):
        if args.time_budget is not None and time.monotonic() - started > args.time_budget:
            print(f"time budget of {args.time_budget:.0f} s reached: {len(shapes) - i} of {len(shapes)} shapes "
                  "not measured")
            break
        results = {backend: measure(M, K, N, activation, dtype, device, backend) for backend in ("torch", "triton")}
        for backend, provider in (("torch", "reference"), ("triton", "fa_triton")):
            r = results[backend]
            peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**10:10.1f}"
            ratio = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / results['torch']['peak_bytes']:10.2f}"
            print(f"{M}x{K}->{N} {activation:9s}".ljust(28) + f" {dtype:5s} {provider:9s} "
                  f"{r['saved_bytes'] / 2**10:10.1f} {peak:>10s} {ratio:>10s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
