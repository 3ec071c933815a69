"""The FA family's cost: each method's forward + backward on fa_triton's kernels against a
plain-PyTorch implementation of the same rule, and a DFA training step against backprop's.

    python -m bench.methods                  # a GPU: the shapes below
    python -m bench.methods --dry-run        # the CPU (Triton's interpreter): tiny shapes, every path once

Per method, one FALinear layer (relu) in ``backend="triton"`` beside ``backend="torch"`` — the
plain-PyTorch rule, which, like BioTorch's layers, materializes B (s·sign(W), |R|·sign(W) with R
drawn, …) as a tensor in the backward: time per fwd+bwd, the bytes autograd saves, and on CUDA
the peak memory of the step above what inputs and parameters hold. fa_triton forms B inside
its kernel from W (usf, frsf, brsf), so its B costs no memory.

DFA step: an MLP of ``--depth`` hidden layers of ``--width`` (relu) and 10 outputs, one training
step (forward, cross-entropy, backward, SGD step) as ``fa_triton.convert(..., method="dfa")``
against the same MLP of ``nn.Linear`` trained by backprop (the issue's goal: DFA ≥ 1.2× faster at
8 × 4096, bf16, batch 8192).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def _timer(device: str, rep_ms: int, cpu_samples: int = 5):
    """ms per call: do_bench's median on CUDA; on the CPU the median of ``cpu_samples`` calls."""
    import torch

    if device == "cuda":
        from triton.testing import do_bench

        def gpu(fn):
            fn()
            torch.cuda.synchronize()
            return float(do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, quantiles=[0.5])[0])
        return gpu

    def cpu(fn):
        fn()
        samples = []
        for _ in range(cpu_samples):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)
    return cpu


def method_rows(M, K, N, dtype_name, device, rep_ms=40):
    """Per method: (method, triton ms, torch ms, triton saved bytes, torch saved bytes, triton peak, torch peak)."""
    import torch

    from fa_triton import METHODS, FALinear

    from .memory import _saved_and_peak

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    timer = _timer(device, rep_ms)
    rows = []
    for method in METHODS:
        result = {}
        for backend in ("triton", "torch"):
            torch.manual_seed(0)
            layer = FALinear(K, N, activation="relu", method=method, backend=backend, device=device, dtype=dtype)
            x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn(M, N, device=device, dtype=dtype)

            def step(layer=layer, x=x, grad=grad):
                layer(x).backward(grad)

            ms = timer(step)
            saved, peak = _saved_and_peak(lambda layer=layer, x=x: layer(x), grad, device,
                                          owned=[x, *layer.parameters(), *layer.buffers()])
            result[backend] = (ms, saved, peak)
        rows.append((method, *(result[b][i] for i in range(3) for b in ("triton", "torch"))))
    return rows


def dfa_step_rows(depth, width, batch, dtype_name, device, rep_ms=40):
    """(variant, ms per training step) for the DFA network and the backprop MLP."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    import fa_triton

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    torch.manual_seed(0)
    modules = [nn.Linear(width, width) for _ in range(depth)]
    mlp = nn.Sequential(*[m for layer in modules for m in (layer, nn.ReLU())], nn.Linear(width, 10))
    mlp = mlp.to(device=device, dtype=dtype)
    dfa = fa_triton.convert(mlp, method="dfa")
    x = torch.randn(batch, width, device=device, dtype=dtype)
    target = torch.randint(0, 10, (batch,), device=device)
    timer = _timer(device, rep_ms)
    rows = []
    for name, model in (("backprop (nn.Linear)", mlp), ("dfa (fa_triton)", dfa)):
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(model=model, optimizer=optimizer):
            loss = F.cross_entropy(model(x).float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        rows.append((name, timer(step)))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--layer", default="8192,4096,4096", help="M,K,N of the per-method layer")
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8192)
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.dtype, args.layer, args.depth, args.width, args.batch = "fp32", "32,24,16", 2, 16, 32
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.methods needs a CUDA GPU (or --dry-run)")
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreter)"
    M, K, N = (int(v) for v in args.layer.split(","))
    print(f"FA methods, one relu layer {M}x{K}->{N} {args.dtype}, fwd+bwd | {where} | torch {torch.__version__}")
    print(f"{'method':9s} {'triton ms':>10s} {'torch ms':>9s} {'x':>6s} {'saved KiB':>20s} {'peak KiB':>20s}")
    for method, t_ms, r_ms, t_saved, r_saved, t_peak, r_peak in method_rows(M, K, N, args.dtype, device):
        peak = "-" if t_peak is None else f"{t_peak / 1024:9.0f} /{r_peak / 1024:9.0f}"
        print(f"{method:9s} {t_ms:10.4f} {r_ms:9.4f} {r_ms / t_ms:6.2f} {t_saved / 1024:9.1f} /{r_saved / 1024:9.1f} "
              f"{peak:>20s}")
    rows = dfa_step_rows(args.depth, args.width, args.batch, args.dtype, device)
    print(f"\ntraining step, MLP {args.depth} x {args.width} (relu) -> 10, batch {args.batch}, {args.dtype}:")
    for name, ms in rows:
        print(f"  {name:22s} {ms:9.4f} ms")
    print(f"  DFA speedup over backprop: {rows[0][1] / rows[1][1]:.2f}x (goal >= 1.2x on a GPU at 8 x 4096)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
