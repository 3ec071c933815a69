"""``fa-triton`` command line (also ``python -m fa_triton``).

    fa-triton train [--model M --method R --dataset D --seeds 0,1,2 ... | --config FILE.toml] [--resume]
    fa-triton reproduce --list | NAME [--quick] [--methods fa,dfa]
    fa-triton tuning-report
    fa-triton --version

``train`` runs one experiment (:mod:`fa_triton.experiments.runner`; with no flags, the founding
tutorial's MNIST MLP) and writes ``metrics.csv``, ``summary.csv``, ``training.png``,
``config.toml`` and per-epoch checkpoints into ``--out``. ``reproduce`` runs a published
protocol by name and prints our numbers beside the paper's (:mod:`fa_triton.experiments.reproduce`).
Multi-process data-parallel: ``--nproc N`` (which starts torchrun). Errors (bad arguments,
missing data, a NaN loss) are one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings
from pathlib import Path

from ..ops.backends import BACKENDS
from .config import DATASETS, MODELS, OPTIMIZERS, RULES, RunConfig, from_mapping, load_toml, parse_list

PROG = "fa-triton"
TRAIN_EXTRA = 'python3 -m pip install -e ".[train]"'


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _typed(kind, check, what: str):
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return convert


_positive_int = _typed(int, lambda v: v > 0, "a positive integer")
_non_negative_int = _typed(int, lambda v: v >= 0, "a non-negative integer")
_positive_float = _typed(float, lambda v: 0 < v < float("inf"), "a positive finite number")
_non_negative_float = _typed(float, lambda v: 0 <= v < float("inf"), "a non-negative finite number")


def _int_list(name: str):
    def convert(text: str):
        try:
            return parse_list(name, text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return convert


def _validation(text: str):
    if text in ("auto", "none"):
        return text
    return _positive_int(text)


def _version() -> str:
    from .. import __version__

    try:
        import torch
        torch_version = torch.__version__
    except ImportError:  # pragma: no cover
        torch_version = "missing"
    try:
        from importlib.metadata import version
        triton_version = version("triton")
    except Exception:
        triton_version = "missing"
    return f"{PROG} {__version__} (torch {torch_version}, triton {triton_version})"


def _add_machine_options(parser: argparse.ArgumentParser) -> None:
    """Where and how fast: the options `train` and `reproduce` share."""
    parser.add_argument("--device", help="auto (CUDA when present; default), cpu, cuda or cuda:N")
    parser.add_argument("--backend", choices=BACKENDS,
                        help="the FA layers' backend: auto (default: timed per step on CUDA, the PyTorch reference "
                             "on CPU), triton, torch")
    parser.add_argument("--data-dir", help="torchvision's data root (holding MNIST/raw/, FashionMNIST/raw/, "
                                           "cifar-10-batches-py/); default: ~/.cache/fa_triton, downloaded there "
                                           "when missing and the machine is online")
    parser.add_argument("--no-download", dest="download", action="store_false", default=None,
                        help="fail instead of downloading missing data")
    parser.add_argument("--threads", type=_positive_int,
                        help="CPU threads per process (torch.set_num_threads); 1 avoids stalls on a busy machine")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Feedback-alignment layers on fused Triton kernels: train and "
                                            "reproduce experiments.")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="{train,reproduce,tuning-report}")

    train = commands.add_parser(
        "train", help="train a model by a rule of the FA family (default: the founding tutorial's MNIST MLP)",
        description="Train one experiment for each seed; print the per-epoch table and the summary over seeds; "
                    "write metrics.csv, summary.csv, training.png, config.toml and checkpoints/ into --out. "
                    "Without flags: the founding tutorial (mlp, fa, mnist, adam 3e-4, batch 64, 10 epochs).",
    )
    train.add_argument("--config", help="a TOML file holding any of these settings (flags override it)")
    train.add_argument("--model", help=f"{', '.join(MODELS)} or package.module:factory (default: mlp)")
    train.add_argument("--method", choices=RULES, help="the learning rule (default: fa)")
    train.add_argument("--dataset", choices=DATASETS, help="default: mnist")
    train.add_argument("--optimizer", choices=OPTIMIZERS, help="default: adam")
    train.add_argument("--lr", type=_positive_float, help="learning rate (default: 3e-4)")
    train.add_argument("--momentum", type=_non_negative_float, help="SGD momentum (default: 0)")
    train.add_argument("--weight-decay", type=_non_negative_float, help="default: 0")
    train.add_argument("--milestones", type=_int_list("milestones"),
                       help="epochs after which the learning rate is multiplied by --gamma, e.g. 100,150,200")
    train.add_argument("--gamma", type=_positive_float, help="learning-rate factor at each milestone (default: 0.1)")
    train.add_argument("--epochs", type=_positive_int, help="default: 10")
    train.add_argument("--batch-size", type=_positive_int,
                       help="batch size; with several processes the global batch, split among them (default: 64)")
    train.add_argument("--seeds", type=_int_list("seeds"), help="comma-separated seeds, one run each (default: 0)")
    train.add_argument("--seed", type=_non_negative_int, help="one seed (the same as --seeds N)")
    train.add_argument("--init", choices=("kaiming", "xavier"), help="weights and feedback init (default: kaiming)")
    train.add_argument("--validation", type=_validation,
                       help="auto (default: cifar10 holds out BioTorch's 5,000 training images; the MNISTs none), "
                            "none, or N (the last N training images)")
    train.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                       help="random flips and crops of the training images (default: on for cifar10 only)")
    train.add_argument("--train-samples", type=_positive_int, help="use only the first N training images (quick runs)")
    train.add_argument("--test-samples", type=_positive_int, help="use only the first N test images")
    _add_machine_options(train)
    train.add_argument("--nproc", type=_positive_int,
                       help="processes for data-parallel training (starts torchrun; gloo on CPU, nccl on CUDA)")
    train.add_argument("--out", help="output folder (default: runs/mnist)")
    again = train.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last checkpoints (its config.toml is the base)")
    again.add_argument("--overwrite", action="store_true", help="start again even if --out holds an unfinished run")
    train.add_argument("--together", action=argparse.BooleanOptionalAction, default=None,
                       help="train the --seeds in one pass (torch.func: stacked models, one vmapped step; models "
                            "without batch norm, dropout or updated buffers such as the mlp and lenet, one "
                            "process, not brsf, wm or dfa; no CUDA graph)")
    train.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", default=None,
                       help="train eagerly on CUDA (default there, for the mlp with adam: the whole step captured "
                            "in one CUDA graph)")

    reproduce = commands.add_parser(
        "reproduce", help="run a published experiment by name and print ours beside theirs",
        description="Run a published protocol (see --list) and print our numbers beside the published ones "
                    "(shipped with the package, with their source).",
    )
    reproduce.add_argument("name", nargs="?", help="the protocol (see --list)")
    reproduce.add_argument("--list", action="store_true", help="list the protocols and what they run")
    reproduce.add_argument("--quick", action="store_true",
                           help="a short form of the protocol (few epochs, a subset of the data): checks that it runs "
                                "and moves, not the published numbers")
    reproduce.add_argument("--methods", help="comma-separated subset of the protocol's rules")
    reproduce.add_argument("--out", help="output folder (default: runs/reproduce/NAME)")
    again = reproduce.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue an interrupted reproduction")
    again.add_argument("--overwrite", action="store_true", help="start again over an unfinished reproduction")
    _add_machine_options(reproduce)

    commands.add_parser(
        "tuning-report", help="list the kernel configs and backend choices the tuner cached on disk, and why",
        description="Print every choice in the tuning cache for this torch, triton and fa_triton: the kernel "
                    "configs, and which of the kernels and the PyTorch reference backend='auto' runs, with the "
                    "timings behind each.",
    )
    return parser


SETTING_FLAGS = ("model", "method", "dataset", "optimizer", "lr", "momentum", "weight_decay", "milestones", "gamma",
                 "epochs", "batch_size", "seeds", "init", "validation", "augment", "train_samples", "test_samples",
                 "device", "backend", "data_dir", "download", "threads", "progress", "nproc", "out", "cuda_graph",
                 "together")


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """Defaults ← the resumed run's config.toml ← --config ← the flags given."""
    given = {name: getattr(args, name) for name in SETTING_FLAGS if getattr(args, name, None) is not None}
    if args.seed is not None:
        if "seeds" in given:
            raise ValueError("pass --seed or --seeds, not both")
        given["seeds"] = (args.seed,)
    from_file = load_toml(args.config) if args.config else None
    base = RunConfig()
    if args.resume:
        out = Path(given.get("out") or (from_file.out if from_file else base.out))
        if (out / "config.toml").is_file():
            base = load_toml(out / "config.toml")
    if args.config:
        base = load_toml(args.config, base)
    return from_mapping(given, base, source="the flags")


def _launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run this command under torchrun with ``nproc`` processes on this machine."""
    forwarded, skip = [], False
    for item in argv:  # every argument but --nproc goes through unchanged
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            forwarded.append(item)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "fa_triton", *forwarded]
    return subprocess.call(command)


def _require(*modules: str) -> None:
    """One line naming the extra to install when a module the command needs is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"{PROG} needs {', '.join(missing)} for this: {TRAIN_EXTRA}")


def _train(config: RunConfig, args: argparse.Namespace) -> int:
    from .report import format_summary, format_table, summarize
    from .runner import run

    _require("pandas", "tqdm", "matplotlib")
    rank = int(os.environ.get("RANK", "0"))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _one_line_warning
        df = run(config, resume=args.resume, overwrite=args.overwrite)
    if rank == 0:
        print(format_table(df))
        print(format_summary(summarize(df)))
        out = Path(config.out)
        print(f"wrote {out / 'metrics.csv'}, {out / 'summary.csv'}, {out / 'training.png'}, "
              f"{out / 'config.toml'} and {out / 'checkpoints'}/")
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)


def _reproduce(args: argparse.Namespace) -> int:
    from . import reproduce

    if args.list:
        print(reproduce.listing(args.name))
        return 0
    if not args.name:
        raise ValueError(f"reproduce needs a protocol name or --list; the protocols: {', '.join(reproduce.NAMES)}")
    _require("pandas", "tqdm", "matplotlib")
    machine = {name: getattr(args, name) for name in ("device", "backend", "data_dir", "download", "threads",
                                                      "progress") if getattr(args, name) is not None}
    methods = None if args.methods is None else [m for m in args.methods.split(",") if m]  # "": an error
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _one_line_warning
        print(reproduce.reproduce(args.name, quick=args.quick, methods=methods, out=args.out, resume=args.resume,
                                  overwrite=args.overwrite, **machine))
    return 0


def _tuning_report() -> int:
    from ..ops.backends import kernels

    autotune = kernels().autotune
    print(f"tuning cache: {autotune.cache_dir() or 'off (FA_TRITON_CACHE_DIR)'}")
    print(autotune.tuning_report(cached=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fa-triton`` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `fa-triton`: what it can do
        parser.print_help()
        return 0
    try:
        if args.command == "train":
            config = resolve_config(args)
            if config.nproc > 1 and "WORLD_SIZE" not in os.environ:
                # What would fail on every rank fails here first, in one line (not N tracebacks).
                from . import datasets

                datasets.ensure_present(config.dataset, config.data_dir, download=config.download)
                return _launch_torchrun(config.nproc, argv)
            return _train(config, args)
        if args.command == "reproduce":
            return _reproduce(args)
        if args.command == "tuning-report":
            return _tuning_report()
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, RuntimeError, OSError) as err:
        # One line, no traceback: the messages name the bad argument, the missing files, or the
        # epoch and step where the loss stopped being finite.
        message = " ".join(str(err).split())
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    return 0
