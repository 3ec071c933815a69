"""Seconds per MNIST training epoch: the FA MLP vs the same MLP with ordinary nn.Linear backprop.

Both train 784-128-64-10 (relu, relu, identity) with Adam lr 3e-4 on shuffled batches of 64
(incomplete batch dropped), data held as tensors on the device. FA does the same FLOPs as
backprop (B in place of W), so the two should take about the same time. Variants:

- ``backprop_plain_loop``: nn.Linear + nn.ReLU in a plain PyTorch training loop (the baseline).
- ``fa_plain_loop``: ``fa_triton.mnist.build_model`` in the same plain loop.
- ``fa_train_epoch``: ``fa_triton.mnist.train_epoch``, whose step (``optimizer_step``) is the eager
  step ``fa_triton.mnist.train`` takes.
- on CUDA also ``backprop_graphed`` and ``fa_graphed``: each step captured whole in a CUDA graph
  (``fa_triton.mnist.GraphedTrainStep``, Adam with ``capturable=True``), the default of ``train``
  on CUDA; and ``fa_triton_plain_loop``, ``fa_triton_graphed``: the model on ``backend="triton"``,
  whose chain runs the fused narrow MLP (one forward launch, one δ-chain launch: docs/kernels.md)
  when its fp32 dots are tf32 (``--tf32``, which allows tf32 for every variant alike).

``--train-epochs N`` then also runs ``fa_triton.mnist.train`` itself for N epochs (its default
mode on the device) and prints the sum of its per-epoch ``seconds`` beside the whole call's
wall time (data loading, evaluation and the CUDA-graph warm-up included).

On a shared machine the speed drifts by tens of percent over seconds, so the variants run
interleaved: each epoch is cut into chunks of ``--chunk`` steps, and the variants take turns
chunk by chunk (in an order that rotates), so that every variant's epoch is timed over the same
stretch of wall time. An epoch's seconds are the sum of its chunks' wall times (the process CPU
time is printed beside it). Reported: the median over ``--rounds`` epochs per variant, and the
ratio of medians to the baseline. ``--csv`` writes long-format rows (one per variant and epoch).

    python3 -m bench.mnist_epoch_time --data-dir ../shared/data --rounds 5 --threads 1
    python3 -m bench.mnist_epoch_time --data-dir ../shared/data --device cuda --train-epochs 10
    python3 -m bench.mnist_epoch_time --data-dir ../shared/data --device cuda --tf32   # the fused MLP too
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from fa_triton.experiments.mnist import (
    GraphedTrainStep,
    batch_indices,
    build_model,
    load_mnist,
    resolve_device,
    train,
    train_epoch,
)

from .results import cpu_name


def backprop_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def plain_loop(model, optimizer, x, y):
    def run(indices) -> None:
        for idx in indices:
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return run


def train_epoch_loop(model, optimizer, x, y):
    return lambda indices: train_epoch(model, optimizer, x, y, indices)


def graphed_loop(model, optimizer, x, y):
    step = GraphedTrainStep(model, optimizer, x, y, 64)
    return lambda indices: train_epoch(model, optimizer, x, y, indices, step=step)


# name -> (model, loop factory, CUDA only)
VARIANTS = {
    "backprop_plain_loop": (backprop_model, plain_loop, False),
    "fa_plain_loop": (build_model, plain_loop, False),
    "fa_train_epoch": (build_model, train_epoch_loop, False),
    "backprop_graphed": (backprop_model, graphed_loop, True),
    "fa_graphed": (build_model, graphed_loop, True),
    "fa_triton_plain_loop": (lambda: build_model(backend="triton"), plain_loop, True),
    "fa_triton_graphed": (lambda: build_model(backend="triton"), graphed_loop, True),
}
BASELINE = "backprop_plain_loop"



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="torchvision MNIST root (holding MNIST/raw/)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5, help="timed epochs per variant")
    parser.add_argument("--chunk", type=int, default=25, help="steps per turn when interleaving the variants")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--csv", default=None, help="write long-format rows to this CSV file")
    parser.add_argument("--tf32", action="store_true",
                        help="allow tf32 in fp32 matmuls (every variant): backend='triton' then runs the fused MLP")
    parser.add_argument("--train-epochs", type=int, default=0,
                        help="then run fa_triton.mnist.train for this many epochs and report its times")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    device = resolve_device(args.device)
    data = load_mnist(args.data_dir, download=False, device=device)
    x, y = data.x_train, data.y_train

    state = {}
    for name, (make, make_loop, cuda_only) in VARIANTS.items():
        if cuda_only and device.type != "cuda":
            continue
        torch.manual_seed(0)
        model = make().to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-4, **({"capturable": True} if cuda_only else {}))
        loop = make_loop(model, optimizer, x, y)
        warmup = batch_indices(len(x), 64, torch.Generator().manual_seed(1))[:100].to(device)
        loop(warmup)  # compiles, tunes and (graphed) captures outside the timing
        state[name] = loop

    names = list(state)
    rows = []
    turn = 0
    for round_ in range(1, args.rounds + 1):
        # The same shuffled epoch for every variant.
        indices = batch_indices(len(x), 64, torch.Generator().manual_seed(round_)).to(device)
        seconds = dict.fromkeys(names, 0.0)
        cpu_seconds = dict.fromkeys(names, 0.0)
        for start in range(0, len(indices), args.chunk):
            chunk = indices[start:start + args.chunk]
            shift = turn % len(names)  # rotate: no variant always goes first
            turn += 1
            for name in names[shift:] + names[:shift]:
                loop = state[name]
                _sync(device)
                wall, cpu = time.perf_counter(), time.process_time()
                loop(chunk)
                _sync(device)
                seconds[name] += time.perf_counter() - wall
                cpu_seconds[name] += time.process_time() - cpu
        for name in names:
            rows.append({"benchmark": "mnist_epoch", "variant": name, "round": round_, "metric": "seconds",
                         "value": seconds[name], "cpu_seconds": cpu_seconds[name], "steps": len(indices),
                         "batch_size": 64, "device": str(device), "threads": torch.get_num_threads(),
                         "cpu": cpu_name(), "torch": torch.__version__})
        print(f"epoch {round_}: " + ", ".join(
            f"{name} {seconds[name]:.3f} s ({seconds[name] / seconds[BASELINE]:.3f}x)" for name in names), flush=True)

    print(f"\n{cpu_name()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, device {device}, "
          f"median over {args.rounds} epochs of {len(indices)} steps")
    for column, label in (("value", "wall"), ("cpu_seconds", "process CPU")):
        medians = {name: statistics.median(r[column] for r in rows if r["variant"] == name) for name in names}
        for name, median in medians.items():
            print(f"{label:12s} {name:20s} {median:7.3f} s/epoch   ratio to {BASELINE} "
                  f"{median / medians[BASELINE]:5.3f}")
    if args.train_epochs:
        _sync(device)
        wall = time.perf_counter()
        df = train(epochs=args.train_epochs, device=device, data_dir=args.data_dir, download=False, progress=False)
        wall = time.perf_counter() - wall
        print(f"fa_triton.mnist.train, {args.train_epochs} epochs on {device}: sum of the epochs' seconds "
              f"{df['seconds'].sum():.3f} s, whole call {wall:.3f} s, acc_test {df['acc_test'].iloc[-1]:.3f}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
