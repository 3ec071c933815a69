"""Host cost of one eager FALinear forward + backward, where the arithmetic is negligible.

    python -m bench.eager_overhead              # batch 4, 8 -> 8, CPU tensors, 1 thread

Two providers on the same tiny layer:

- ``triton (launches stubbed)``: ``backend="triton"`` under ``TRITON_INTERPRET=1`` with every
  Triton kernel's ``run`` replaced by a no-op: everything between the module call and the
  launches counts (argument checks, backend, autograd Function, launch plans, allocations);
  the kernels themselves do not run.
- ``torch``: ``backend="torch"``, the PyTorch reference with its real (tiny) ops.

The ratio triton / torch is the eager Python overhead of the Triton path relative to PyTorch's
own ops (goal: at most 1.2). Each sample times ``--steps`` steps of
``layer(x).backward(grad)``; the median of ``--repeats`` samples is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def measure(batch: int = 4, features: int = 8, steps: int = 2000, repeats: int = 9, activation: str = "relu"):
    """{provider: µs per forward + backward step}."""
    import torch

    import fa_triton
    from fa_triton.kernels.launchers import JIT_KERNELS

    results = {}
    saved = {name: kernel.run for name, kernel in JIT_KERNELS.items()}
    try:
        for provider, backend in (("triton (launches stubbed)", "triton"), ("torch", "torch")):
            if backend == "triton":
                for kernel in JIT_KERNELS.values():
                    kernel.run = lambda *args, grid, warmup, **kwargs: None
            else:
                for name, run in saved.items():
                    JIT_KERNELS[name].run = run
            layer = fa_triton.FALinear(features, features, activation=activation, backend=backend)
            x = torch.randn(batch, features, requires_grad=True)
            grad = torch.randn(batch, features)

            def step(layer=layer, x=x, grad=grad):
                layer(x).backward(grad)

            for _ in range(50):
                step()
            samples = []
            for _ in range(repeats):
                start = time.perf_counter_ns()
                for _ in range(steps):
                    step()
                samples.append((time.perf_counter_ns() - start) / steps / 1e3)
            results[provider] = statistics.median(samples)
    finally:
        for name, run in saved.items():
            JIT_KERNELS[name].run = run
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    import platform

    import torch

    torch.set_num_threads(args.threads)
    results = measure(args.batch, args.features, args.steps, args.repeats)
    print(f"eager FALinear forward + backward, batch {args.batch}, {args.features} -> {args.features}, relu | "
          f"CPU {platform.machine()}, {args.threads} thread(s) | torch {torch.__version__} | "
          f"median of {args.repeats} x {args.steps} steps")
    for provider, us in results.items():
        print(f"  {provider:28s} {us:8.2f} us/step")
    ratio = results["triton (launches stubbed)"] / results["torch"]
    print(f"  ratio triton / torch: {ratio:.2f} (goal <= 1.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
