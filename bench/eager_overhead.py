"""Host cost of one eager FALinear forward + backward, where the arithmetic is negligible, beside
``nn.Linear`` + ReLU: the cost a user compares with.

    python -m bench.eager_overhead              # batch 4, 8 -> 8, CPU tensors, 1 thread

The providers, on the same tiny layer (x requires grad, so every gradient is formed):

- ``triton (launches stubbed)``: ``backend="triton"`` under ``TRITON_INTERPRET=1`` with every
  Triton kernel's ``run`` replaced by a no-op: everything between the module call and the
  launches counts (argument checks, backend, autograd Function, launch plans, allocations);
  the kernels themselves do not run.
- ``torch``: ``backend="torch"``, the PyTorch reference with its real (tiny) ops.
- ``nn.Linear + ReLU``: ``torch.relu(linear(x))`` under ordinary autograd.
- ``minimal Function``: a bare ``torch.autograd.Function`` doing the FA layer's aten ops and
  nothing else (addmm, relu; threshold_backward, two mm, a sum): the floor of any Python
  autograd Function, so what lies above it is the layer's own Python.
- ``module + minimal Function``: an ``nn.Module`` holding weight, bias and B whose forward only
  calls that Function: the floor of any module built on a Python autograd Function (no
  argument checks, no rule or backend dispatch).
- ``module + bare Triton Function (launches stubbed)``: the same module whose Function makes
  the Triton path's four launches (the layer's own kernels, argument lists, grids and
  constexprs, recorded from one of its steps) and its five allocations, and nothing else: the
  floor of the Triton path, so what lies above it is the launchers' and the layer's Python.
- ``auto, kernels chosen (launches stubbed)``: ``backend="auto"`` as it runs on a GPU whose
  timings chose the kernels for every step (the default there): the layer resolves "auto" to
  the AUTO backend for these CPU tensors (its resolution cache says so while this script runs),
  and a memory-only tuner whose timer makes the kernels faster made the four choices before the
  timing. What auto adds to the Triton path is its choice per step.

Reported: µs per step and each FA provider's ratio to nn.Linear + ReLU (goal: at most 1.1).
The providers are timed in turn (their order rotating from round to round), ``--repeats``
rounds of ``--steps`` steps each, and each
provider's fastest round is reported, as ``timeit`` does: on a shared machine other jobs and
the hypervisor only ever add time to a round, so the fastest is the cost itself, and short
interleaved rounds give every provider the same chances of a quiet one.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

PROVIDERS = ("triton (launches stubbed)", "torch", "nn.Linear + ReLU", "minimal Function", "module + minimal Function",
             "module + bare Triton Function (launches stubbed)", "auto, kernels chosen (launches stubbed)")
#: The kernels of the Triton path's step at this size, in launch order (the bare Function's).
BARE_KERNELS = ("forward_kernel", "local_error_kernel", "backward_input_kernel", "backward_weight_kernel")


def measure(batch: int = 4, features: int = 8, steps: int = 200, repeats: int = 100, activation: str = "relu"):
    """{provider: µs per forward + backward step, the fastest round's}."""
    import torch

    import fa_triton
    from fa_triton.kernels import autotune
    from fa_triton.kernels.launchers import JIT_KERNELS
    from fa_triton.ops.backends import AUTO, clear_auto_choices, registry

    torch.manual_seed(0)
    x = torch.randn(batch, features, requires_grad=True)
    grad = torch.randn(batch, features)
    triton_layer = fa_triton.FALinear(features, features, activation=activation, backend="triton")
    torch_layer = fa_triton.FALinear(features, features, activation=activation, backend="torch")
    linear = torch.nn.Linear(features, features)
    feedback = torch.randn(features, features)

    class Minimal(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, feedback):
            y = torch.relu(torch.addmm(bias, x, weight.t()))
            ctx.save_for_backward(x, feedback, y)
            return y

        @staticmethod
        def backward(ctx, grad_y):
            x, feedback, y = ctx.saved_tensors
            delta = torch.ops.aten.threshold_backward(grad_y, y, 0)
            return delta.mm(feedback), delta.t().mm(x), delta.sum(0), None

    class MinimalModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.bias = linear.weight, linear.bias
            self.register_buffer("feedback", feedback)

        def forward(self, x):
            return Minimal.apply(x, self.weight, self.bias, self.feedback)

    minimal_module = MinimalModule()
    saved = {name: kernel.run for name, kernel in JIT_KERNELS.items()}

    def stubbed(on: bool) -> None:
        for name, kernel in JIT_KERNELS.items():
            kernel.run = (lambda *args, grid, warmup, **kwargs: None) if on else saved[name]

    launches = _record_launches(JIT_KERNELS, lambda: triton_layer(x).backward(grad))
    forward_kernel, local_error_kernel, input_kernel, weight_kernel = (JIT_KERNELS[name] for name in BARE_KERNELS)
    (forward_grid, forward_meta), (pass_grid, pass_meta), (input_grid, input_meta), (weight_grid, weight_meta) = (
        (grid, meta) for _, _, grid, meta in launches)

    class BareTriton(torch.autograd.Function):
        # The argument lists of the plans' pointer kernels for one model (kernels/plans.py,
        # kernels/launchers.py); _record_launches checks that their lengths match the layer's.
        @staticmethod
        def forward(ctx, x, weight, bias, feedback):
            (M, K), N = x.shape, weight.shape[0]
            y = x.new_empty(M, N)
            forward_kernel.run(x, weight, bias, y, y, y, M, N, K, K, 0, *x.stride(), 0, *weight.stride(), 0, 0,
                               *y.stride(), 0.0, grid=forward_grid, warmup=False, **forward_meta)
            ctx.save_for_backward(x, feedback, y)
            return y

        @staticmethod
        def backward(ctx, grad_y):
            x, feedback, y = ctx.saved_tensors
            (M, N), K = grad_y.shape, x.shape[1]
            delta, grad_b = grad_y.new_empty(M, N), grad_y.new_empty(N)
            local_error_kernel.run(grad_y, y, delta, grad_b, M, N, M, 0, *grad_y.stride(), 0, *y.stride(), 0,
                                   *delta.stride(), 0, 0.0, grid=pass_grid, warmup=False, **pass_meta)
            grad_x = feedback.new_empty(M, K)
            input_kernel.run(delta, feedback, grad_x, M, N, K, 0, *delta.stride(), 0, *feedback.stride(), 0,
                             *grad_x.stride(), grid=input_grid, warmup=False, **input_meta)
            grad_w = x.new_empty(N, K)
            weight_kernel.run(delta, x, grad_w, M, N, K, M, 0, *delta.stride(), 0, *x.stride(), 0, 0, K, 1,
                              grid=weight_grid, warmup=False, **weight_meta)
            return grad_x, grad_w, grad_b, None

    class BareModule(MinimalModule):
        def forward(self, x):
            return BareTriton.apply(x, self.weight, self.bias, self.feedback)

    bare_module = BareModule()
    counts = [len(args) for _, args, _, _ in _record_launches(JIT_KERNELS, lambda: bare_module(x).backward(grad))]
    if counts != [len(args) for _, args, _, _ in launches]:
        raise RuntimeError(f"the bare Function's launches take {counts} arguments, the layer's "
                           f"{[len(args) for _, args, _, _ in launches]}: update BareTriton to the kernels' signatures")

    # "auto" as on a GPU that chose the kernels: resolved to AUTO (the resolution cache, restored
    # below), its choices made by a memory-only tuner whose timer puts the kernels first.
    resolution_key, tuner = ("auto", x.device.type, x.dtype), autotune.TUNER
    resolution = registry._RESOLVED.get(resolution_key)
    times = itertools.cycle((1.0, 2.0))  # the candidates are timed in order: triton, then torch
    auto_layer = fa_triton.FALinear(features, features, activation=activation, backend="auto")

    steps_of = {
        PROVIDERS[0]: lambda: triton_layer(x).backward(grad),
        PROVIDERS[1]: lambda: torch_layer(x).backward(grad),
        PROVIDERS[2]: lambda: torch.relu(linear(x)).backward(grad),
        PROVIDERS[3]: lambda: Minimal.apply(x, linear.weight, linear.bias, feedback).backward(grad),
        PROVIDERS[4]: lambda: minimal_module(x).backward(grad),
        PROVIDERS[5]: lambda: bare_module(x).backward(grad),
        PROVIDERS[6]: lambda: auto_layer(x).backward(grad),
    }
    samples = {provider: [] for provider in PROVIDERS}
    try:
        registry._RESOLVED[resolution_key] = AUTO
        autotune.TUNER = autotune.Tuner(timer=lambda fn: (fn(), next(times))[1], directory=None)
        clear_auto_choices()
        for round_ in range(repeats + 1):
            # The order rotates from round to round: a provider timed always right after the same
            # other one (the stubbed Triton path's large Python) kept a bias of its own.
            shift = round_ % len(PROVIDERS)
            for provider in PROVIDERS[shift:] + PROVIDERS[:shift]:
                step = steps_of[provider]
                stubbed(provider in (PROVIDERS[0], PROVIDERS[5], PROVIDERS[6]))
                start = time.perf_counter_ns()
                for _ in range(steps if round_ else 50):  # round 0 warms up
                    step()
                if round_:
                    samples[provider].append((time.perf_counter_ns() - start) / steps / 1e3)
        chosen = {entry.choice for entry in autotune.TUNER.entries.values()}
        if chosen != {"triton"}:
            raise RuntimeError(f"auto chose {chosen} for its steps, not the kernels alone")
    finally:
        stubbed(False)
        registry._RESOLVED.pop(resolution_key, None)
        if resolution is not None:
            registry._RESOLVED[resolution_key] = resolution
        autotune.TUNER = tuner
        clear_auto_choices()
    return {provider: min(values) for provider, values in samples.items()}


def _record_launches(kernels: dict, step) -> list:
    """[(kernel name, args, grid, constexprs and options)] of the launches ``step()`` makes once
    warm (a first call builds the launch plans), the kernels stubbed (their ``run`` restored
    after); raises unless they are BARE_KERNELS in order."""
    saved = {name: kernel.run for name, kernel in kernels.items()}
    launches = []

    def recorder(name):
        return lambda *args, grid, warmup, **meta: launches.append((name, args, grid, meta))

    try:
        for name, kernel in kernels.items():
            kernel.run = recorder(name)
        step()
        launches.clear()
        step()
    finally:
        for name, kernel in kernels.items():
            kernel.run = saved[name]
    if tuple(name for name, _, _, _ in launches) != BARE_KERNELS:
        raise RuntimeError(f"the step launched {[name for name, _, _, _ in launches]}, expected {BARE_KERNELS}")
    return launches


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported
    import platform

    import torch

    torch.set_num_threads(args.threads)
    results = measure(args.batch, args.features, args.steps, args.repeats)
    print(f"eager forward + backward, batch {args.batch}, {args.features} -> {args.features}, relu | "
          f"CPU {platform.machine()}, {args.threads} thread(s) | torch {torch.__version__} | "
          f"fastest of {args.repeats} interleaved rounds of {args.steps} steps")
    base = results["nn.Linear + ReLU"]
    for provider, us in results.items():
        print(f"  {provider:48s} {us:8.2f} us/step  x{us / base:.2f} of nn.Linear + ReLU")
    print("  goal: FALinear <= 1.1x nn.Linear + ReLU (the minimal Function: the floor of a Python Function; "
          "module + minimal Function: of a module built on one; module + bare Triton Function: of the Triton path)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
