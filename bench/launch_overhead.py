"""Host cost of fa_triton's launchers: the Python from the call to Triton's launch.

    python -m bench.launch_overhead                 # CPU: Triton's interpreter, launches stubbed
    python -m bench.launch_overhead --device cuda   # the same harness on CUDA tensors

Every kernel's ``run`` (``fa_triton.kernels.launchers.JIT_KERNELS``) is replaced by a no-op, so
the launch itself (Triton's argument binding and the driver call) is not counted, and outputs
are preallocated (``out=``), so allocation is not counted either (except grad_b of the δ pass,
which has no ``out=``): what remains is the launcher's own work per call — the plan lookup
and the argument list. Each launcher is called as the layer's autograd calls it: the forward,
the δ pass ``fa_linear_local_error``, and the two GEMMs on δ. Plans are built (and on a GPU
tuned) before the timing. Reports the median over ``--repeats`` runs of ``--calls`` calls
each, in microseconds per call (goal: at most 5 µs per launcher call).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

SHAPES = ((4, 8, 8), (64, 784, 128))  # (M, in_features, out_features)
GOAL_US = 5.0
LAUNCHERS = ("fa_linear_forward", "fa_linear_local_error", "fa_linear_backward_input", "fa_linear_backward_weight")


def _stub_launches() -> dict:
    """Replace every kernel's ``run`` (``launchers.JIT_KERNELS``) by a no-op; returns the saved ones."""
    from fa_triton.kernels.launchers import JIT_KERNELS

    saved = {}
    for name, kernel in JIT_KERNELS.items():
        saved[name] = kernel.run
        kernel.run = lambda *args, grid, warmup, **kwargs: None
    return saved


def _restore(saved: dict) -> None:
    from fa_triton.kernels.launchers import JIT_KERNELS

    for name, run in saved.items():
        JIT_KERNELS[name].run = run


def _per_call_us(fn, calls: int, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter_ns() - start) / calls / 1e3)
    return statistics.median(samples)


def measure(device: str, calls: int = 2000, repeats: int = 7) -> list[tuple[str, tuple, float]]:
    """(launcher, (M, K, N), µs per call) for each launcher and shape, called as the layer's
    autograd calls them: the forward, the δ pass (δ and grad_b), then the two GEMMs on δ
    (``activation="identity"``: no δ pass inside them)."""
    import torch

    from fa_triton import kernels

    rows = []
    saved = _stub_launches()
    try:
        for M, K, N in SHAPES:
            x = torch.randn(M, K, device=device)
            weight = torch.randn(N, K, device=device)
            bias = torch.randn(N, device=device)
            y = torch.empty(M, N, device=device)
            grad_y = torch.randn(M, N, device=device)
            delta = torch.empty(M, N, device=device)
            grad_x = torch.empty(M, K, device=device)
            grad_w = torch.empty(N, K, device=device)
            launches = {
                "fa_linear_forward": functools.partial(kernels.fa_linear_forward, x, weight, bias, "relu", 0.0,
                                                       False, y),
                # grad_b has no out= (the launcher allocates it: counted)
                "fa_linear_local_error": functools.partial(kernels.fa_linear_local_error, grad_y, y, "relu", 0.0,
                                                           store_delta=True, bias_grad=True, out=delta),
                "fa_linear_backward_input": functools.partial(kernels.fa_linear_backward_input, delta, None, weight,
                                                              "identity", out=grad_x),
                "fa_linear_backward_weight": functools.partial(kernels.fa_linear_backward_weight, delta, None, x,
                                                               "identity", 0.0, False, out=(grad_w, None)),
            }
            for name, fn in launches.items():
                fn()  # builds (and on a GPU tunes) the plan
                rows.append((name, (M, K, N), _per_call_us(fn, calls, repeats)))
    finally:
        _restore(saved)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier timings)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    import platform

    import torch

    torch.set_num_threads(args.threads)
    cpu = platform.processor() or platform.machine()
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU {cpu}"
    print(f"launcher host cost, launches stubbed, outputs preallocated | {where} | python {sys.version.split()[0]} "
          f"| torch {torch.__version__} | median of {args.repeats} x {args.calls} calls")
    for name, (M, K, N), us in measure(args.device, args.calls, args.repeats):
        print(f"{name:28s} {M:>5d}x{K:<4d}->{N:<4d} {us:7.2f} us/call" + ("" if us <= GOAL_US else "  (goal <= 5)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
