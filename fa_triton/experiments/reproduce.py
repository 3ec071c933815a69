"""Published experiments by name: ``fa-triton reproduce NAME`` runs the protocol and prints our
numbers beside the published ones (:mod:`fa_triton.experiments.published`).

=========================== ==========================================================================
tutorial                    the founding tutorial: MNIST MLP 784-128-64-10 by FA, Adam 3e-4, 10 epochs
akrout-mnist                Akrout et al. (2019): 784-500-10 sigmoid, BCE, SGD, 400 epochs; BP, FA, WM, KP
biotorch-mnist              BioTorch: LeNet on MNIST, SGD, 100 epochs; BP, FA, DFA, uSF, brSF, frSF
biotorch-fashion-mnist      the same protocol on Fashion-MNIST
biotorch-cifar10-resnet20   BioTorch: ResNet-20 on CIFAR-10 (45k/5k), SGD, 250 epochs, best-validation model
=========================== ==========================================================================

``quick=True`` runs a short form (few epochs, a subset of the data where the full set is slow):
it checks that the protocol runs and learns; its numbers are not comparable with the papers'.
Every rule of a protocol trains through the runner (:func:`fa_triton.experiments.runner.run`)
into ``out/<rule>/`` (Akrout's protocol has its own loop: its loss, init and bias learning
rates are theirs), so ``resume=True`` continues an interrupted reproduction.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

from . import published
from .config import RunConfig
from .published import Published


class Protocol(NamedTuple):
    name: str
    title: str
    published: Published
    methods: tuple[str, ...]
    describe: str
    """The protocol in a line: model, data, optimizer, schedule, seed."""
    quick: str
    """What ``quick`` changes."""
    config: Callable[[str, bool], RunConfig] | None
    """The runner's config for a rule (None: the protocol has its own loop)."""
    compare: Callable
    """(protocol, {rule: rows}, quick) -> the table's lines."""


# ------------------------------------------------------------------------------------- protocols

def _tutorial_config(method: str, quick: bool) -> RunConfig:
    return RunConfig(epochs=1 if quick else 10, seeds=(0,), validation="none")


def _biotorch_config(dataset: str) -> Callable[[str, bool], RunConfig]:
    def config(method: str, quick: bool) -> RunConfig:
        return RunConfig(model="lenet", method=method, dataset=dataset, optimizer="sgd",
                         lr=published.BIOTORCH_MNIST_LR[method], momentum=0.9, weight_decay=1e-3,
                         milestones=(50, 75), epochs=1 if quick else 100, batch_size=64, seeds=(2021,), init="xavier",
                         validation="none", augment=False)
    return config


def _cifar_config(method: str, quick: bool) -> RunConfig:
    return RunConfig(model="resnet20", method=method, dataset="cifar10", optimizer="sgd",
                     lr=0.001 if method == "dfa" else 0.1, momentum=0.9, weight_decay=1e-4, milestones=(100, 150, 200),
                     epochs=1 if quick else 250, batch_size=128, seeds=(2021,), init="xavier", validation="auto",
                     augment=True, train_samples=2560 if quick else None, test_samples=1000 if quick else None)


def _fmt(value, digits=2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _compare_tutorial(protocol: Protocol, results: dict, quick: bool) -> list[str]:
    rows = results["fa"]
    theirs = protocol.published.values["fa"]
    by_epoch = {row["epoch"]: row for row in rows}
    lines = [f"{'':14s} {'ours':>7s} {'theirs':>7s}"]
    for key, (column, epoch) in (("acc_test@1", ("acc_test", 1)), ("acc_test@10", ("acc_test", 10)),
                                 ("loss_test@10", ("loss_test", 10))):
        ours = by_epoch[epoch][column] if epoch in by_epoch else None
        lines.append(f"{key:14s} {_fmt(ours, 3):>7s} {theirs[key]:7.3f}")
    return lines


def _compare_error(protocol: Protocol, results: dict, quick: bool) -> list[str]:
    """Test error %: the best epoch (by validation accuracy where held out, else by test: theirs) and the last."""
    lines = [f"{'rule':10s} {'ours: best (epoch)':>20s} {'last':>7s} {'theirs':>7s}   test error %"]
    for method, rows in results.items():
        by = "acc_val" if "acc_val" in rows[0] else "acc_test"
        best = max(rows, key=lambda row: row[by])
        last = rows[-1]
        best_text = f"{100 * (1 - best['acc_test']):.2f} ({best['epoch']})"
        lines.append(f"{method:10s} {best_text:>20s} {100 * (1 - last['acc_test']):7.2f} "
                     f"{protocol.published.values[method]:7.2f}")
    return lines


def _compare_akrout(protocol: Protocol, results: dict, quick: bool) -> list[str]:
    angles = protocol.published.extra["output-layer angle (degrees)"]
    lines = [f"{'rule':10s} {'acc_test %':>10s} {'theirs':>7s} {'angle':>7s} {'theirs':>7s}   at the last epoch "
             "(angle: output layer, W to B)"]
    for method, rows in results.items():
        last = rows[-1]
        angle = None if method == "backprop" else float(last["angle_1"])
        lines.append(f"{method:10s} {float(last['acc_test']):10.2f} {protocol.published.values[method]:7.2f} "
                     f"{_fmt(angle, 1):>7s} {_fmt(angles.get(method), 1):>7s}")
    return lines


PROTOCOLS = {p.name: p for p in (
    Protocol("tutorial", "the founding tutorial: MNIST MLP by feedback alignment", published.TUTORIAL, ("fa",),
             "mlp 784-128-64-10 (relu, relu, identity), fa, Adam lr 3e-4, batch 64, 10 epochs, kaiming init, seed 0",
             "1 epoch", _tutorial_config, _compare_tutorial),
    Protocol("akrout-mnist", "Akrout et al. (2019), MNIST", published.AKROUT_MNIST, ("backprop", "fa", "wm", "kp"),
             "784-500-10 sigmoid, BCE on one-hot labels, SGD (BP, FA 0.2; WM 0.05; KP 0.3), batch 128 in order, "
             "400 epochs, their Gaussian init, seed 1111", "2 epochs", None, _compare_akrout),
    Protocol("biotorch-mnist", "BioTorch, MNIST LeNet", published.BIOTORCH_MNIST,
             ("backprop", "fa", "dfa", "usf", "brsf", "frsf"),
             "LeNet, images 32x32 normalized, SGD momentum 0.9 weight decay 1e-3 (lr per rule: ours, they did not "
             "publish theirs), batch 64, 100 epochs (lr/10 at 50, 75), xavier init, seed 2021; best epoch on test",
             "1 epoch", _biotorch_config("mnist"), _compare_error),
    Protocol("biotorch-fashion-mnist", "BioTorch, Fashion-MNIST LeNet", published.BIOTORCH_FASHION_MNIST,
             ("backprop", "fa", "dfa", "usf", "brsf", "frsf"),
             "as biotorch-mnist, on Fashion-MNIST (the MNIST learning rates)", "1 epoch",
             _biotorch_config("fashion-mnist"), _compare_error),
    Protocol("biotorch-cifar10-resnet20", "BioTorch, CIFAR-10 ResNet-20 (SGD)", published.BIOTORCH_CIFAR10_RESNET20,
             ("backprop", "fa", "dfa", "usf", "brsf", "frsf"),
             "ResNet-20, 45k/5k split, flips and crops, SGD lr 0.1 (DFA 0.001) momentum 0.9 weight decay 1e-4, "
             "batch 128, 250 epochs (lr/10 at 100, 150, 200), xavier init, seed 2021; test error of the "
             "best-validation epoch", "1 epoch on 2,560 training and 1,000 test images", _cifar_config,
             _compare_error),
)}
NAMES = tuple(PROTOCOLS)


def listing(name: str | None = None) -> str:
    """``fa-triton reproduce --list [NAME]``: every protocol, or ``name``'s."""
    if name is not None:
        _check(name, None)
    lines = []
    for p in PROTOCOLS.values() if name is None else [PROTOCOLS[name]]:
        lines += [f"{p.name}: {p.title}", f"    protocol: {p.describe}", f"    rules: {', '.join(p.methods)}",
                  f"    --quick: {p.quick}", f"    published: {p.published.source}"]
    return "\n".join(lines)


def _check(name: str, methods) -> tuple[Protocol, tuple[str, ...]]:
    if name not in PROTOCOLS:
        raise ValueError(f"no protocol {name!r}; the protocols: {', '.join(NAMES)} (fa-triton reproduce --list)")
    protocol = PROTOCOLS[name]
    if methods is None:
        return protocol, protocol.methods
    unknown = [m for m in methods if m not in protocol.methods]
    if unknown or not methods:
        raise ValueError(f"--methods {','.join(methods)}: {name} has the rules {', '.join(protocol.methods)}")
    return protocol, tuple(methods)


def reproduce(name: str, *, quick: bool = False, methods=None, out=None, resume: bool = False,
              overwrite: bool = False, echo=print, **machine) -> str:
    """Run protocol ``name`` for ``methods`` (default: all its rules) and return the comparison table.

    ``machine``: any of ``device, backend, data_dir, download, threads, progress`` (the
    runner's settings of where and how fast). Results go to ``out`` (default
    ``runs/reproduce/NAME``), one folder per rule.
    """
    protocol, methods = _check(name, methods)
    out = Path(out or Path("runs") / "reproduce" / (name + ("-quick" if quick else "")))
    results = {}
    for method in methods:
        if protocol.config is None:
            results[method] = _run_akrout(method, quick, out, resume, echo, **machine)
        else:
            config = protocol.config(method, quick).replace(out=str(out / method), **machine)
            if len(methods) > 1:
                echo(f"{name}: {method}")  # the epoch lines that follow are this rule's
            results[method] = _run_config(config, resume, overwrite, quick)
    head = f"{protocol.name}: {protocol.title}" + ("  [QUICK RUN: not comparable with theirs]" if quick else "")
    lines = [head, f"protocol: {protocol.describe}" + (f"; quick: {protocol.quick}" if quick else ""), ""]
    lines += protocol.compare(protocol, results, quick)
    lines += ["", f"theirs: {protocol.published.source}", f"ours: {out}/"]
    return "\n".join(lines)


def _run_config(config: RunConfig, resume: bool, overwrite: bool, quick: bool) -> list[dict]:
    from .runner import run

    has_checkpoints = any((Path(config.out) / "checkpoints").glob("seed*.pt"))
    with warnings.catch_warnings():
        if quick:  # short by design: the table's head says so once, not a warning per rule
            warnings.filterwarnings("ignore", message="only .* optimizer steps", category=UserWarning)
        df = run(config, resume=resume and has_checkpoints, overwrite=overwrite)
    return df.to_dict("records")


def _run_akrout(method: str, quick: bool, out: Path, resume: bool, echo, *, device: str = "auto",
                backend: str = "torch", data_dir=None, download: bool = True, threads=None,
                progress: bool = True) -> list[dict]:
    import torch

    from . import akrout
    from .training import resolve_device

    if threads is not None:
        torch.set_num_threads(threads)
    data = akrout.load(data_dir, download=download, device=resolve_device(device))
    rows = akrout.run_method(method, data, 2 if quick else akrout.EPOCHS, out, backend=backend, resume=resume,
                             progress=progress, echo=echo if progress else (lambda line: None))
    return rows
