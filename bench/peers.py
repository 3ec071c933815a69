"""One training step of the founding tutorial's MLP on the CPU, fa_triton beside its peer library
BioTorch and plain ``nn.Linear`` backprop, method by method (issue "host cost as nn.Linear's").

    python -m bench.peers                                    # the full run (about a minute)
    python -m bench.peers --biotorch-path /path/to/biotorch  # BioTorch's source tree put first on sys.path
    python -m bench.peers --quick                            # a smoke run: a few tiny rounds

The step: MLP 784-128-64-10 (ReLU, ReLU, identity), batch 64, fp32, ``zero_grad``, forward,
cross-entropy, backward, optimizer step (Adam lr 3e-4 as the tutorial; ``--optimizer sgd``), one
torch thread by default. Providers, each with its own model and optimizer, for each method of
(backprop, fa, usf, frsf, brsf) and for dfa:

- ``fa_triton``: ``fa_triton.models.mlp(method=m, backend="torch")``, an ``FASequential`` of
  ``FALinear`` layers (the chain as one autograd Function; on the CPU ``"auto"`` is this same
  reference path); dfa: ``fa_triton.convert(nn.Sequential(nn.Linear, nn.ReLU, ...),
  method="dfa", backend="torch")``, a ``DFANetwork``;
- ``biotorch``: BioTorch's layer of that method (``biotorch.layers.<m>.Linear(in, out, bias,
  layer_config)``; backprop: ``biotorch.layers.backpropagation.Linear``) in an ``nn.Sequential`` with
  ``nn.ReLU``; dfa: BioTorch's own wiring, ``BioModule(mlp, mode="dfa", output_dim=10)`` called as
  ``model(x, targets, loss_function)`` (it broadcasts ∂L/∂output to every layer's backward hook),
  then the loss and its backward as in BioTorch's training loop. Skipped, with the reason printed,
  when ``import biotorch`` fails (or a BioTorch model fails to build or step);
- ``per_layer``: the same ``FALinear`` layers in a plain ``nn.Sequential`` (each layer its own
  autograd Function; not for dfa): FASequential's ratio to it is the chain's gain;
- ``nn``: the same MLP of ``nn.Linear`` + ``nn.ReLU`` under ordinary autograd: the baseline.

Timing: one process, interleaved rounds. Each round times every (method, provider) in turn, ``--steps``
steps each (the groups' order rotates from round to round, and so does the providers' order within a
group: fa_triton, per-layer, BioTorch, nn, shifted by one each round; nn is timed once per group, beside
each method). Round 0 warms up and is not counted. Reported per provider: the median and the min over
rounds of ms per step; the ratios are the median over rounds of the per-round ratio of the two providers
timed side by side (the same group), which keeps a busy machine's drift out of them.

The issue's goals, printed beside the numbers: every method's step ≤ BioTorch's (fa_triton/BioTorch
≤ 1); fa ≤ 1.05× backprop's (nn); DFA's step < backprop's.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import statistics
import sys
import time
import warnings

from .results import cpu_name

METHODS = ("backprop", "fa", "usf", "frsf", "brsf", "dfa")
PROVIDERS = ("fa_triton", "per_layer", "biotorch", "nn")
SIZES = (784, 128, 64, 10)  # the founding tutorial's MLP: relu, relu, identity
BIOTORCH_LAYERS = {"backprop": "backpropagation", "fa": "fa", "usf": "usf", "frsf": "frsf", "brsf": "brsf"}

GOAL_BIOTORCH = 1.0   # every method's step <= BioTorch's
GOAL_FA = 1.05        # fa <= 1.05x backprop's
GOAL_DFA = 1.0        # DFA's step < backprop's (strictly)


def import_biotorch(path: str | None = None):
    """(biotorch module, None) or (None, why not). ``path``: put first on sys.path."""
    if path:
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import biotorch
            import biotorch.layers.backpropagation
            import biotorch.layers.brsf
            import biotorch.layers.dfa
            import biotorch.layers.fa
            import biotorch.layers.frsf
            import biotorch.layers.usf
            import biotorch.module.biomodule  # noqa: F401
    except Exception as error:  # any failure of the optional peer: a skip with its reason
        return None, f"import biotorch failed: {type(error).__name__}: {error}"
    return biotorch, None


def _nn_mlp():
    from torch import nn

    return nn.Sequential(nn.Linear(SIZES[0], SIZES[1]), nn.ReLU(), nn.Linear(SIZES[1], SIZES[2]), nn.ReLU(),
                         nn.Linear(SIZES[2], SIZES[3]))


def _fa_triton_model(method: str, chain: bool = True):
    from torch import nn

    import fa_triton

    if method == "dfa":
        return fa_triton.convert(_nn_mlp(), method="dfa", backend="torch")
    model = fa_triton.models.mlp(SIZES, method=method, backend="torch")  # an FASequential
    return model if chain else nn.Sequential(*model)


def _biotorch_model(biotorch, method: str):
    """BioTorch's MLP of ``method`` (for dfa a BioModule, which wants (x, targets, loss_function))."""
    import importlib

    from torch import nn

    with contextlib.redirect_stdout(io.StringIO()):  # BioTorch prints its conversions
        if method == "dfa":
            from biotorch.module.biomodule import BioModule

            return BioModule(_nn_mlp(), mode="dfa", output_dim=SIZES[-1])
        layer = importlib.import_module(f"biotorch.layers.{BIOTORCH_LAYERS[method]}").Linear
        modules = []
        for k, (n_in, n_out) in enumerate(zip(SIZES, SIZES[1:])):
            # BioTorch's default options (xavier init); a fresh dict per layer, as its converter does
            modules.append(layer(n_in, n_out, True, {"type": method, "options": {
                "constrain_weights": False, "gradient_clip": False, "init": "xavier"}}))
            if k < len(SIZES) - 2:
                modules.append(nn.ReLU())
        return nn.Sequential(*modules)


def _step_fn(model, optimizer, x, target, dfa_biotorch: bool = False):
    import torch.nn.functional as F

    if dfa_biotorch:
        def step():
            optimizer.zero_grad()
            out = model(x, target, F.cross_entropy)
            loss = F.cross_entropy(out, target)
            loss.backward()
            optimizer.step()
    else:
        def step():
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
    return step


def _optimizer(name: str, params):
    import torch

    if name == "adam":
        return torch.optim.Adam(params, lr=3e-4)
    return torch.optim.SGD(params, lr=1e-2)


def build_steps(methods=METHODS, optimizer: str = "adam", batch: int = 64, biotorch=None, seed: int = 0):
    """({(method, provider): step callable}, {(method, provider): why skipped}); nn's step is
    shared by every method (key ``(None, "nn")``)."""
    import torch

    torch.manual_seed(seed)
    x = torch.rand(batch, SIZES[0])
    target = torch.randint(0, SIZES[-1], (batch,))
    steps, skipped = {}, {}

    def add(key, make, dfa_biotorch=False):
        try:
            model = make()
            step = _step_fn(model, _optimizer(optimizer, model.parameters()), x, target, dfa_biotorch)
            with warnings.catch_warnings():  # BioTorch's DFA uses the deprecated register_backward_hook
                warnings.simplefilter("ignore")
                step()  # it must run once before it is timed
        except Exception as error:
            if key[1] != "biotorch":
                raise
            skipped[key] = f"{type(error).__name__}: {error}"
            return
        steps[key] = step

    add((None, "nn"), _nn_mlp)
    for method in methods:
        add((method, "fa_triton"), lambda method=method: _fa_triton_model(method))
        if method != "dfa":
            add((method, "per_layer"), lambda method=method: _fa_triton_model(method, chain=False))
        if biotorch is not None:
            add((method, "biotorch"), lambda method=method: _biotorch_model(biotorch, method), method == "dfa")
    return steps, skipped


def _time(step, n: int) -> float:
    """ms per step over ``n`` back-to-back steps."""
    start = time.perf_counter_ns()
    for _ in range(n):
        step()
    return (time.perf_counter_ns() - start) / n / 1e6


def _round(methods, step_of, count: int, shift: int = 0) -> dict:
    """{method: {provider: ms per step}}: each method's group in turn, its providers in the order
    fa_triton, per-layer, BioTorch, nn rotated by ``shift`` (a provider's place in the group, which
    the one before it can slow or speed, changes from round to round)."""
    by_method = {}
    order = PROVIDERS[shift % len(PROVIDERS):] + PROVIDERS[:shift % len(PROVIDERS)]
    for method in methods:
        by_method[method] = times = {}
        for provider in order:
            key = (None, "nn") if provider == "nn" else (method, provider)
            if key in step_of:
                times[provider] = _time(step_of[key], count)
    return by_method


def measure(methods=METHODS, steps: int = 100, rounds: int = 15, warmup_steps: int = 20, optimizer: str = "adam",
            batch: int = 64, biotorch=None, threads: int | None = 1):
    """Interleaved timing. Returns ``(samples, paired, skipped)``:
    ``samples[(method, provider)]`` ms per step per round (nn's under ``(None, "nn")``, one per
    method group and round); ``paired[(method, provider)]`` per round, the ms of that provider and
    of the fa_triton of the same method group ``(fa_triton ms, other ms)`` for provider biotorch
    and nn; ``skipped[(method, "biotorch")]`` the reason."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    step_of, skipped = build_steps(methods, optimizer, batch, biotorch)
    samples = {key: [] for key in step_of}
    paired = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for round_ in range(rounds + 1):  # round 0 warms up
            gc.collect()  # between rounds, untimed (about 0.2 s with torch loaded); off while timing, as in timeit
            gc.disable()
            try:
                by_method = _round(methods[round_ % len(methods):] + methods[:round_ % len(methods)], step_of,
                                   steps if round_ else warmup_steps, shift=round_)
            finally:
                gc.enable()
            if not round_:
                continue
            for method, times in by_method.items():
                for provider, ms in times.items():
                    samples[(None, "nn") if provider == "nn" else (method, provider)].append(ms)
                    if provider != "fa_triton":
                        paired.setdefault((method, provider), []).append((times["fa_triton"], ms))
    return samples, paired, skipped


def summarize(samples, paired, methods=METHODS):
    """One row per method: dict with the ms (median, min) of each provider and the paired ratios
    (median over rounds of fa_triton / other), None where not measured."""
    def stats(key):
        values = samples.get(key)
        return (statistics.median(values), min(values)) if values else None

    def ratio(method, provider):
        pairs = paired.get((method, provider))
        return statistics.median(a / b for a, b in pairs) if pairs else None

    nn = stats((None, "nn"))
    return [{"method": method, "fa_triton": stats((method, "fa_triton")), "per_layer": stats((method, "per_layer")),
             "biotorch": stats((method, "biotorch")), "nn": nn, "x_per_layer": ratio(method, "per_layer"),
             "x_biotorch": ratio(method, "biotorch"), "x_nn": ratio(method, "nn")} for method in methods]


def goals(rows) -> list[tuple[str, bool | None, str]]:
    """The issue's goals: (goal, met or None when unmeasured, the numbers behind it)."""
    by_method = {row["method"]: row for row in rows}
    result = []
    vs_biotorch = [(row["method"], row["x_biotorch"]) for row in rows]
    measured = [(m, r) for m, r in vs_biotorch if r is not None]
    if measured:
        worse = [f"{m} {r:.3f}x" for m, r in measured if r > GOAL_BIOTORCH]
        met = not worse and len(measured) == len(vs_biotorch)
        detail = ("over: " + ", ".join(worse)) if worse else "all " + ", ".join(f"{m} {r:.3f}x" for m, r in measured)
        if len(measured) < len(vs_biotorch):
            detail += "; unmeasured: " + ", ".join(m for m, r in vs_biotorch if r is None)
            met = False if worse else None
        result.append(("every method's step <= BioTorch's", met, detail))
    else:
        result.append(("every method's step <= BioTorch's", None, "BioTorch not measured"))
    for method, goal, bound, strict in (("fa", "fa <= 1.05x backprop's (nn)", GOAL_FA, False),
                                        ("dfa", "DFA's step < backprop's (nn)", GOAL_DFA, True)):
        row = by_method.get(method)
        if row is None or row["x_nn"] is None:
            result.append((goal, None, "not measured"))
        else:
            r = row["x_nn"]
            result.append((goal, r < bound if strict else r <= bound, f"{r:.3f}x"))
    return result


def _ms(stat) -> str:
    return "-" if stat is None else f"{stat[0]:.3f} ({stat[1]:.3f})"


def _x(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_table(rows, skipped=None, biotorch_reason=None) -> str:
    lines = ["| method | fa_triton ms | per-layer ms | BioTorch ms | nn backprop ms | fa_triton/per-layer | "
             "fa_triton/BioTorch | fa_triton/backprop |",
             "|--|--:|--:|--:|--:|--:|--:|--:|"]
    for row in rows:
        lines.append(f"| {row['method']} | {_ms(row['fa_triton'])} | {_ms(row.get('per_layer'))} | "
                     f"{_ms(row['biotorch'])} | {_ms(row['nn'])} | {_x(row.get('x_per_layer'))} | "
                     f"{_x(row['x_biotorch'])} | {_x(row['x_nn'])} |")
    lines.append("")
    lines.append("ms: median (min) over rounds; ratios: median over rounds of the per-round ratio; fa_triton is "
                 "the FASequential chain, per-layer the same FALinear layers in an nn.Sequential; the dfa row's "
                 "fa_triton/backprop is DFA/backprop")
    if biotorch_reason:
        lines.append(f"BioTorch skipped: {biotorch_reason}")
    for (method, _), reason in sorted((skipped or {}).items()):
        lines.append(f"BioTorch {method} skipped: {reason}")
    lines.append("goals:")
    for goal, met, detail in goals(rows):
        lines.append(f"  {goal:38s} {'unmeasured' if met is None else 'MET' if met else 'NOT MET':10s} ({detail})")
    return "\n".join(lines)



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--biotorch-path", default=None, help="prepend to sys.path before importing biotorch")
    parser.add_argument("--no-biotorch", action="store_true", help="do not time BioTorch")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100, help="steps per provider per round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 3 steps")
    args = parser.parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        parser.error(f"--methods: unknown {unknown}, choose from {METHODS}")
    if args.quick:
        args.steps, args.rounds, args.warmup_steps = 3, 2, 1
    import torch

    biotorch, reason = (None, "--no-biotorch") if args.no_biotorch else import_biotorch(args.biotorch_path)
    samples, paired, skipped = measure(methods, args.steps, args.rounds, args.warmup_steps, args.optimizer,
                                       args.batch, biotorch, args.threads)
    rows = summarize(samples, paired, methods)
    version = getattr(biotorch, "__version__", None) if biotorch is not None else None
    if biotorch is not None and version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version("biotorch")
        except Exception:
            version = "unknown version"
    print(f"training step, MLP {'-'.join(map(str, SIZES))} (relu, relu, identity), batch {args.batch}, fp32, "
          f"cross-entropy + {args.optimizer} | CPU {cpu_name()} ({os.cpu_count()} cores), "
          f"{torch.get_num_threads()} thread(s) | torch {torch.__version__} | "
          f"BioTorch {version if biotorch is not None else 'not measured'} | "
          f"{args.rounds} interleaved rounds of {args.steps} steps")
    print(format_table(rows, skipped, reason))
    return 0


if __name__ == "__main__":
    sys.exit(main())
