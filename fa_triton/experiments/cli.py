"""``fa-triton`` command line (also ``python -m fa_triton``).

    fa-triton train --epochs 10 --data-dir DIR --device cpu --backend auto --seed 0 --out runs/mnist
    fa-triton tuning-report

trains the founding tutorial's MNIST MLP (:func:`fa_triton.mnist.train`), prints the final
table rounded to 3 digits, and writes ``metrics.csv`` and ``training.png`` into ``--out``.
Multi-process data-parallel: ``torchrun --nproc_per_node 2 -m fa_triton train ...`` or
``fa-triton train --nproc 2 ...`` (which starts that torchrun). Errors (bad arguments,
missing data) are one line on stderr and a non-zero exit code. ``tuning-report`` prints the
tuner's cached choices (``fa_triton.kernels.tuning_report``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from ..ops.backends import BACKENDS

PROG = "fa-triton"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Feedback-alignment layers on fused Triton kernels.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands.add_parser(
        "tuning-report", help="list the kernel configs and backend choices the tuner cached on disk, and why",
        description="Print every choice in the tuning cache for this torch, triton and fa_triton: the kernel "
                    "configs, and which of the kernels and the PyTorch reference backend='auto' runs, with the "
                    "timings behind each.",
    )
    train = commands.add_parser(
        "train", help="train the founding tutorial's MLP on MNIST by feedback alignment",
        description="Train the 784-128-64-10 FA MLP on MNIST; print the per-epoch table and write "
                    "metrics.csv and training.png into --out.",
    )
    train.add_argument("--epochs", type=_positive_int, default=10, help="default: 10")
    train.add_argument("--lr", type=_positive_float, default=3e-4, help="Adam learning rate (default: 3e-4)")
    train.add_argument("--batch-size", type=_positive_int, default=64,
                       help="batch size; with several processes the global batch, split among them (default: 64)")
    train.add_argument("--seed", type=int, default=0, help="default: 0")
    train.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    train.add_argument("--backend", choices=BACKENDS, default="auto",
                       help="FALinear backend: auto (Triton on CUDA, PyTorch reference on CPU), triton, torch")
    train.add_argument("--data-dir", default=None,
                       help="folder holding MNIST/raw/ (torchvision layout); default: ~/.cache/fa_triton")
    train.add_argument("--no-download", action="store_true", help="fail instead of downloading missing MNIST files")
    train.add_argument("--out", default="runs/mnist", help="output folder for metrics.csv and training.png "
                                                            "(default: runs/mnist)")
    train.add_argument("--nproc", type=_positive_int, default=1,
                       help="processes for data-parallel training (starts torchrun; gloo on CPU, nccl on CUDA)")
    train.add_argument("--train-samples", type=_positive_int, default=None,
                       help="use only the first N training images (quick runs)")
    train.add_argument("--test-samples", type=_positive_int, default=None, help="use only the first N test images")
    train.add_argument("--threads", type=_positive_int, default=None,
                       help="CPU threads per process (torch.set_num_threads); 1 avoids stalls on a busy machine")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--no-cuda-graph", action="store_true",
                       help="train eagerly on CUDA (default there: the whole step captured in one CUDA graph)")
    return parser


def _launch_torchrun(args: argparse.Namespace, argv: list[str]) -> int:
    """Re-run this command under torchrun with ``args.nproc`` processes on this machine."""
    forwarded, skip = [], False
    for item in argv:  # every argument but --nproc goes through unchanged
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            forwarded.append(item)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "fa_triton", *forwarded]
    return subprocess.call(command)


def _train(args: argparse.Namespace) -> int:
    import torch

    from .mnist import format_table, plot_training, train

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rank = int(os.environ.get("RANK", "0"))
    out = Path(args.out)
    if rank == 0:
        # Fail before training, not after, if the results cannot be written.
        out.mkdir(parents=True, exist_ok=True)
    df = train(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed, device=args.device,
        backend=args.backend, data_dir=args.data_dir, download=not args.no_download,
        progress=not args.no_progress, train_samples=args.train_samples, test_samples=args.test_samples,
        cuda_graph=False if args.no_cuda_graph else None,
    )
    if rank == 0:
        print(format_table(df))
        df.to_csv(out / "metrics.csv", index=False)
        plot_training(df, out / "training.png")
        print(f"wrote {out / 'metrics.csv'} and {out / 'training.png'}")
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
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
                return _launch_torchrun(args, argv)
            return _train(args)
        if args.command == "tuning-report":
            return _tuning_report()
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, RuntimeError, OSError) as err:
        # One line, no traceback: the messages name the bad argument or the missing files.
        message = " ".join(str(err).split())
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    return 0
