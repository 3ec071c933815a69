"""Akrout et al. (2019)'s MNIST table with fa_triton's layers: BP, FA, WM and KP on 784-500-10.

    python3 bench/akrout_mnist.py --data-dir ../shared/data                 # all four, 400 epochs
    python3 bench/akrout_mnist.py --data-dir ../shared/data --methods fa --epochs 5   # a quick look

Their protocol (``makrout/Deep-Learning-without-Weight-Transport``: ``main.py``,
``fcnn/FCNN_{BP,FA,WM,KP}.py``, ``run.sh``), as this script follows it:

- 784-500-10, sigmoid on both layers; loss: binary cross-entropy of the sigmoid outputs against
  one-hot labels, summed over the classes, averaged over the batch (here computed from the
  output layer's logits with ``binary_cross_entropy_with_logits``: the same loss and the same
  output error σ(z) − y, without the saturation of σ in floating point);
- images / 255, no normalisation; batches of 128 taken in order, no shuffling, the last 96
  images dropped (468 steps per epoch); 400 epochs; seed 1111;
- W, b and B drawn from N(0, 1/(fan_in + fan_out)) (their Gaussian init; biases too);
- plain SGD, no momentum, no weight decay; learning rate BP 0.2, FA 0.2, WM 0.05, KP 0.3; their
  code divides the bias update by the batch size twice, so the biases learn at lr/128;
- KP: B gets W's update (``FALinear(method="kp")``: B is a Parameter whose gradient is W's, in
  W's parameter group), with no decay (their code's default factor 1);
- WM: 468 mirror steps before training, then one after every SGD step, every layer:
  noise U(±0.05) [128, in], y = σ(x Wᵀ + b), B += 0.01 · yᵀx (``FALinear.mirror``);
- after every epoch: accuracy on the 10k test images (argmax of the outputs), the angle
  between W and B of each layer (flattened, degrees; layer 1 is the 500→10 output layer, whose
  angle their paper reports).

Their numbers (``experiments/mnist/*/results.json``, final epoch): test accuracy BP 98.50,
FA 97.80, WM 98.49, KP 98.45 (%); output-layer angle FA 40.0°, WM 3.8°, KP 3.6°.

Resumable: each method's state (model, optimizer, RNG, rows) is saved every ``--checkpoint-every``
epochs under ``--state-dir``; a rerun continues from there. Rows go to ``--csv``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fa_triton import FALinear
from fa_triton.experiments.mnist import load_mnist
from fa_triton.metrics import angle_between

from .checkpoint import load_run, save_run
from .results import replace_rows

LEARNING_RATES = {"backprop": 0.2, "fa": 0.2, "wm": 0.05, "kp": 0.3}
THEIRS = {"backprop": (98.50, None), "fa": (97.80, 40.0), "wm": (98.49, 3.8), "kp": (98.45, 3.6)}
BATCH = 128
COLUMNS = ("method", "epoch", "loss_train", "acc_test", "angle_0", "angle_1", "seconds", "lr", "seed")


def build(method: str) -> nn.Sequential:
    """784-500-10: sigmoid hidden layer; the output layer's sigmoid is in the loss (logits out)."""
    model = nn.Sequential(FALinear(784, 500, activation="sigmoid", method=method, backend="torch"),
                          FALinear(500, 10, activation="identity", method=method, backend="torch"))
    with torch.no_grad():
        for layer in model:
            std = math.sqrt(1.0 / (layer.in_features + layer.out_features))
            for tensor in (layer.weight, layer.bias, layer.feedback):
                if tensor is not None:
                    tensor.normal_(0.0, std)
    return model


def mirror(model: nn.Sequential) -> None:
    """One weight-mirroring step of every layer, each with the response through σ (as theirs)."""
    for layer in model:
        layer.mirror(batch_size=BATCH, eta=0.01, noise_amplitude=0.1, activation="sigmoid")


def angles(model: nn.Sequential) -> list[float]:
    return [0.0 if layer.method == "backprop" else angle_between(layer.weight, layer.feedback_matrix())
            for layer in model]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item() * 100


def run_method(method: str, data, epochs: int, state_dir: Path, csv_path: Path, checkpoint_every: int,
               seed: int) -> list[dict]:
    state_path = state_dir / f"akrout-{method}-seed{seed}.pt"
    lr = LEARNING_RATES[method]
    run = {"method": method, "seed": seed, "lr": lr, "train_samples": len(data.x_train)}  # what a resume must match
    torch.manual_seed(seed)
    model = build(method)
    weights = [p for name, p in model.named_parameters() if not name.endswith("bias")]  # W (and B for kp)
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    optimizer = torch.optim.SGD([{"params": weights, "lr": lr}, {"params": biases, "lr": lr / BATCH}], lr=lr)
    rows, start = [], 0
    state = load_run(state_path, run)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        rows, start = state["rows"], state["epoch"]
        print(f"{method}: resuming after epoch {start}", flush=True)
    elif method == "wm":
        for _ in range(len(data.x_train) // BATCH):  # their 468 mirror steps before training
            mirror(model)
    x_train, y_train = data.x_train, data.y_train
    onehot = F.one_hot(y_train, 10).to(x_train.dtype)
    steps = len(x_train) // BATCH
    for epoch in range(start + 1, epochs + 1):
        began = time.perf_counter()
        losses = torch.zeros(steps)
        for i in range(steps):
            rows_i = slice(i * BATCH, (i + 1) * BATCH)
            logits = model(x_train[rows_i])
            loss = F.binary_cross_entropy_with_logits(logits, onehot[rows_i], reduction="sum") / BATCH
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if method == "wm":
                mirror(model)
            losses[i] = loss.detach()
        seconds = time.perf_counter() - began
        layer_angles = angles(model)
        row = {"method": method, "epoch": epoch, "loss_train": losses.mean().item(),
               "acc_test": accuracy(model, data.x_test, data.y_test), "angle_0": layer_angles[0],
               "angle_1": layer_angles[1], "seconds": seconds, "lr": lr, "seed": seed}
        rows.append(row)
        print(f"{method} epoch {epoch}: loss {row['loss_train']:.4f} acc_test {row['acc_test']:.2f} "
              f"angles {row['angle_0']:.1f} {row['angle_1']:.1f} ({seconds:.1f} s)", flush=True)
        if epoch % checkpoint_every == 0 or epoch == epochs:
            replace_rows(csv_path, COLUMNS, rows, key=("method", "seed"))
            save_run(state_path, run, model=model.state_dict(), optimizer=optimizer.state_dict(),
                     rng=torch.get_rng_state(), rows=rows, epoch=epoch)
    return rows


def summary(csv_path: Path) -> list[str]:
    """Ours (final epoch) beside theirs, per method and seed."""
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    lines = ["method   seed  epochs  acc_test (theirs)   output-layer angle (theirs)"]
    for method in LEARNING_RATES:
        for seed in sorted({r["seed"] for r in rows if r["method"] == method}):
            mine = [r for r in rows if r["method"] == method and r["seed"] == seed]
            last = max(mine, key=lambda r: int(r["epoch"]))
            acc, angle = THEIRS[method]
            lines.append(f"{method:8s} {seed:>5s} {last['epoch']:>7s}  {float(last['acc_test']):6.2f} ({acc:.2f})"
                         f"      {float(last['angle_1']):5.1f}° ({'-' if angle is None else f'{angle:.1f}°'})")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="torchvision MNIST root (holding MNIST/raw/)")
    parser.add_argument("--methods", default="backprop,fa,wm,kp")
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1111)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--csv", default="bench/results/akrout-mnist.csv")
    parser.add_argument("--state-dir", default="runs/akrout-mnist", help="checkpoints for resuming")
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--train-samples", type=int, default=None, help="first N training images (quick runs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in LEARNING_RATES]
    if bad:
        raise SystemExit(f"error: --methods got {bad}; choose from {list(LEARNING_RATES)}")
    data = load_mnist(args.data_dir, download=False)
    if args.train_samples:
        data = data._replace(x_train=data.x_train[:args.train_samples], y_train=data.y_train[:args.train_samples])
    state_dir, csv_path = Path(args.state_dir), Path(args.csv)
    state_dir.mkdir(parents=True, exist_ok=True)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    for method in methods:
        run_method(method, data, args.epochs, state_dir, csv_path, args.checkpoint_every, args.seed)
    print("\n".join(summary(csv_path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
