"""torch.compile against eager for the founding tutorial's MLP: is compiled at least as fast?

    python -m bench.compile_overhead            # CPU, 1 thread, batch 64, the reference backend

The 784-128-64-10 FA MLP (relu, relu, identity), fwd + bwd of a summed output, eager and
``torch.compile(fullgraph=True)`` (after warm-up: compilation is not timed), timed in turn,
``--repeats`` rounds of ``--steps`` steps each; the median per provider and the ratio
compiled / eager (goal: at most 1.0) are printed. On the CPU the layers run the reference
backend, which torch.compile traces through (plain aten ops Inductor fuses). The same network
of ``nn.Linear`` + ReLU is timed both ways in the same rounds: torch.compile's own per-call
cost (Dynamo's guards, AOT autograd's runtime wrapper) on a model this small.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def measure(batch: int = 64, steps: int = 100, repeats: int = 9, device: str = "cpu") -> dict:
    """{"eager", "compiled", "nn_eager", "nn_compiled"}: ms per fwd + bwd step, FALinear's
    network and nn.Linear's."""
    import torch
    from torch import nn

    import fa_triton

    def make():
        torch.manual_seed(0)
        return nn.Sequential(fa_triton.FALinear(784, 128, device=device), fa_triton.FALinear(128, 64, device=device),
                             fa_triton.FALinear(64, 10, activation="identity", device=device))

    def make_nn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(784, 128, device=device), nn.ReLU(), nn.Linear(128, 64, device=device),
                             nn.ReLU(), nn.Linear(64, 10, device=device))

    x = torch.randn(batch, 784, device=device)
    models = {"eager": make(), "compiled": torch.compile(make(), fullgraph=True),
              "nn_eager": make_nn(), "nn_compiled": torch.compile(make_nn(), fullgraph=True)}
    samples = {name: [] for name in models}
    for round_ in range(repeats + 1):
        for name, model in models.items():
            start = time.perf_counter()
            for _ in range(steps if round_ else 20):  # round 0 compiles and warms up
                model(x).sum().backward()
            if device != "cpu":
                torch.cuda.synchronize()
            if round_:
                samples[name].append((time.perf_counter() - start) / steps * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    import platform

    import torch

    torch.set_num_threads(args.threads)
    result = measure(args.batch, args.steps, args.repeats, args.device)
    print(f"tutorial MLP 784-128-64-10, batch {args.batch}, fwd+bwd | {args.device} ({platform.machine()}), "
          f"{args.threads} thread(s) | torch {torch.__version__} | median of {args.repeats} interleaved rounds")
    print(f"  eager     {result['eager']:.3f} ms/step")
    ratio = result["compiled"] / result["eager"]
    print(f"  compiled  {result['compiled']:.3f} ms/step   compiled / eager = {ratio:.2f} (goal <= 1.0)")
    nn_ratio = result["nn_compiled"] / result["nn_eager"]
    print(f"  nn.Linear eager {result['nn_eager']:.3f}, compiled {result['nn_compiled']:.3f} ms/step   "
          f"compiled / eager = {nn_ratio:.2f}; FALinear compiled / nn.Linear compiled = "
          f"{result['compiled'] / result['nn_compiled']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
