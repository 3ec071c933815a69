"""Many seeds in one pass against one run after another: the founding tutorial's MLP trained by
``--seeds`` models at once (``torch.func.stack_module_state``, one Adam over the stacked
parameters) or by each model in turn (eager FASequential, its own Adam), the same steps and
batches. One pass two ways: "one pass", ``vmap`` over ``functional_call`` and one backward of
the summed losses through plain autograd (on backend "triton" or "auto" on CUDA: one stacked
launch per job for all seeds, the kernels' vmap rule); "one pass, grad", ``vmap(grad(...))``
(the layers' aten-op form, on every backend).

    python -m bench.ensemble                 # 8 seeds, fa, batch 64, CPU (reference backend), 1 thread
    python -m bench.ensemble --quick         # a smoke run
    python -m bench.ensemble --device cuda   # on a GPU, backend "auto" (the goal: 8 seeds in <= 1.5x one seed's step)

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


def build(seeds: int, method: str, batch: int, device: str = "cpu", backend: str | None = None):
    """(one_by_one, together, together_grad): each runs one training step of every seed's model
    (``backend``: the layers', default "torch" on the CPU and "auto" on a GPU)."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, stack_module_state, vmap

    import fa_triton

    backend = backend or ("torch" if device == "cpu" else "auto")
    models = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        models.append(fa_triton.models.mlp(SIZES, method=method, backend=backend, device=device))
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

    base = copy.deepcopy(models[0]).to("meta")

    def loss(params, buffers, x, target):
        return F.cross_entropy(functional_call(base, (params, buffers), (x,)), target)

    params, buffers = stack_module_state(models)  # leaves that require grad
    optimizer = torch.optim.Adam(params.values(), lr=3e-4)
    losses = vmap(loss)

    def together():
        optimizer.zero_grad(set_to_none=True)
        losses(params, buffers, x, target).sum().backward()
        optimizer.step()

    params_grad, buffers_grad = stack_module_state(models)
    optimizer_grad = torch.optim.Adam(params_grad.values(), lr=3e-4)
    vmapped = vmap(grad(loss))

    def together_grad():
        grads = vmapped(params_grad, buffers_grad, x, target)
        for name, p in params_grad.items():
            p.grad = grads[name]
        optimizer_grad.step()

    return one_by_one, together, together_grad


def measure(seeds: int = 8, method: str = "fa", batch: int = 64, steps: int = 20, rounds: int = 7,
            device: str = "cpu", backend: str | None = None):
    """{"one by one": ms, "one pass": ms, "one pass, grad": ms} per step of all the seeds (median over rounds)."""
    import torch

    one_by_one, together, together_grad = build(seeds, method, batch, device, backend)
    ways = {"one by one": one_by_one, "one pass": together, "one pass, grad": together_grad}
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
    parser.add_argument("--backend", default=None, help='the layers\' backend (default: "torch" on the CPU, "auto" on '
                                                        'a GPU; "triton" on the CPU needs TRITON_INTERPRET=1)')
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 1 round of 2 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.rounds = 2, 2, 1
    import platform

    import torch

    torch.set_num_threads(args.threads)
    result = measure(args.seeds, args.method, args.batch, args.steps, args.rounds, args.device, args.backend)
    backend = args.backend or ("torch" if args.device == "cpu" else "auto")
    where = (f"CPU {platform.machine()}, {torch.get_num_threads()} thread(s)" if args.device == "cpu"
             else torch.cuda.get_device_name(torch.device(args.device)))
    print(f"training step of {args.seeds} seeds, MLP {'-'.join(map(str, SIZES))}, method {args.method}, backend "
          f"{backend}, batch {args.batch}, Adam | {where} | torch {torch.__version__} | median of {args.rounds} "
          f"interleaved rounds of {args.steps} steps")
    for name, ms in result.items():
        print(f"  {name:14s} {ms:8.2f} ms per step of all seeds")
    one_seed = result["one by one"] / args.seeds  # one seed's step, as each of the one-by-one runs
    print(f"  one pass / one by one: {result['one pass'] / result['one by one']:.2f}x; one pass / one seed's step: "
          f"{result['one pass'] / one_seed:.2f}x (GPU goal for 8 seeds: <= 1.5); one pass, grad / one by one: "
          f"{result['one pass, grad'] / result['one by one']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
