"""Many seeds in one pass against one run after another: the founding tutorial's MLP trained by
``--seeds`` models at once (``torch.func.stack_module_state`` + ``vmap(grad(...))`` over
``functional_call``, one Adam over the stacked parameters) or by each model in turn (eager
FASequential, its own Adam), the same steps and batches.

    python -m bench.ensemble                 # 8 seeds, fa, batch 64, CPU, 1 thread
    python -m bench.ensemble --quick         # a smoke run
    python -m bench.ensemble --device cuda   # on a GPU (the goal: 8 seeds in <= 1.5x one seed's step)

Reported: ms per training step of all the seeds together, each way, and the ratios: one pass
over one after another (below 1: the pass is faster), and one pass over one seed's step (the
one-by-one time over the seeds; the GPU goal for 8 seeds: at most 1.5). Timed in interleaved
rounds; the median per way.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

SIZES = (784, 128, 64, 10)


def build(seeds: int, method: str, batch: int, device: str = "cpu"):
    """(one_by_one step, together step): each runs one training step of every seed's model."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, stack_module_state, vmap

    import fa_triton

    models = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        # On a GPU the one-by-one runs take the layers' fastest path ("auto"); vmapped, every backend
        # runs the layers' aten-op form.
        models.append(fa_triton.models.mlp(SIZES, method=method, backend="torch" if device == "cpu" else "auto",
                                           device=device))
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(seeds, batch, SIZES[0], generator=gen).to(device)
    target = torch.randint(0, SIZES[-1], (seeds, batch), generator=gen).to(device)

    separate = [copy.deepcopy(model) for model in models]
    optimizers = [torch.optim.Adam(model.parameters(), lr=3e-4) for model in separate]

    def one_by_one():
        for k, (model, optimizer) in enumerate(zip(separate, optimizers)):
            optimizer.zero_grad()
            F.cross_entropy(model(x[k]), target[k]).backward()
            optimizer.step()

    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    optimizer = torch.optim.Adam(params.values(), lr=3e-4)

    def loss(params, buffers, x, target):
        return F.cross_entropy(functional_call(base, (params, buffers), (x,)), target)

    vmapped = vmap(grad(loss))

    def together():
        grads = vmapped(params, buffers, x, target)
        for name, p in params.items():
            p.grad = grads[name]
        optimizer.step()

    return one_by_one, together


def measure(seeds: int = 8, method: str = "fa", batch: int = 64, steps: int = 20, rounds: int = 7,
            device: str = "cpu"):
    """{"one by one": ms, "one pass": ms} per step of all the seeds (median over rounds)."""
    import torch

    one_by_one, together = build(seeds, method, batch, device)
    ways = {"one by one": one_by_one, "one pass": together}
    samples = {name: [] for name in ways}
    for round_ in range(rounds + 1):  # round 0 warms up
        for name, step in ways.items():
            if device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter_ns()
            for _ in range(steps if round_ else 2):
                step()
            if device != "cpu":
                torch.cuda.synchronize()
            if round_:
                samples[name].append((time.perf_counter_ns() - start) / steps / 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--method", default="fa")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 1 round of 2 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.rounds = 2, 2, 1
    import platform

    import torch

    torch.set_num_threads(args.threads)
    result = measure(args.seeds, args.method, args.batch, args.steps, args.rounds, args.device)
    where = (f"CPU {platform.machine()}, {torch.get_num_threads()} thread(s)" if args.device == "cpu"
             else torch.cuda.get_device_name(torch.device(args.device)))
    print(f"training step of {args.seeds} seeds, MLP {'-'.join(map(str, SIZES))}, method {args.method}, batch "
          f"{args.batch}, Adam | {where} | torch {torch.__version__} | median of {args.rounds} interleaved rounds "
          f"of {args.steps} steps")
    for name, ms in result.items():
        print(f"  {name:12s} {ms:8.2f} ms per step of all seeds")
    one_seed = result["one by one"] / args.seeds  # one seed's step, as each of the one-by-one runs
    print(f"  one pass / one by one: {result['one pass'] / result['one by one']:.2f}x; one pass / one seed's step: "
          f"{result['one pass'] / one_seed:.2f}x (GPU goal for 8 seeds: <= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
