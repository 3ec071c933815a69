"""Seconds per MNIST training epoch: the FA MLP vs the same MLP with ordinary nn.Linear backprop.

Both train 784-128-64-10 (relu, relu, identity) with Adam lr 3e-4 on shuffled batches of 64
(incomplete batch dropped), data held as tensors on the device. FA does the same FLOPs as
backprop (B in place of W), so the two should take about the same time. Variants:

- ``backprop_plain_loop``: nn.Linear + nn.ReLU in a plain PyTorch training loop (the baseline).
- ``fa_plain_loop``: ``fa_triton.mnist.build_model`` in the same plain loop.
- ``fa_train_epoch``: ``fa_triton.mnist.train_epoch``, the loop that ``fa_triton.mnist.train`` runs.

On a shared machine the speed drifts by tens of percent over seconds, so the variants run
interleaved: each epoch is cut into chunks of ``--chunk`` steps, and the variants take turns
chunk by chunk (in an order that rotates), so that every variant's epoch is timed over the same
stretch of wall time. An epoch's seconds are the sum of its chunks' wall times (the process CPU
time is printed beside it). Reported: the median over ``--rounds`` epochs per variant, and the
ratio of medians to the baseline. ``--csv`` writes long-format rows (one per variant and epoch).

    python3 bench/mnist_epoch_time.py --data-dir ../shared/data --rounds 5 --threads 1
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from fa_triton.mnist import batch_indices, build_model, load_mnist, resolve_device, train_epoch


def backprop_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def plain_loop(model, optimizer, x, y, indices) -> None:
    for idx in indices:
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


VARIANTS = {
    "backprop_plain_loop": (backprop_model, plain_loop),
    "fa_plain_loop": (build_model, plain_loop),
    "fa_train_epoch": (build_model, train_epoch),
}
BASELINE = "backprop_plain_loop"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = load_mnist(args.data_dir, download=False, device=device)
    x, y = data.x_train, data.y_train

    state = {}
    for name, (make, loop) in VARIANTS.items():
        torch.manual_seed(0)
        model = make().to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
        warmup = batch_indices(len(x), 64, torch.Generator().manual_seed(1))[:100].to(device)
        loop(model, optimizer, x, y, warmup)
        state[name] = (model, optimizer, loop)

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
                model, optimizer, loop = state[name]
                _sync(device)
                wall, cpu = time.perf_counter(), time.process_time()
                loop(model, optimizer, x, y, chunk)
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
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
