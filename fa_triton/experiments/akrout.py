"""Akrout et al. (2019)'s MNIST table with fa_triton's layers: BP, FA, WM and KP on 784-500-10.

    fa-triton reproduce akrout-mnist --data-dir DIR                   # all four, 400 epochs
    fa-triton reproduce akrout-mnist --data-dir DIR --methods fa --quick   # a quick look

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

Resumable: each method's state (model, optimizer, RNG, rows) is saved every ``checkpoint_every``
epochs under ``out/checkpoints``; a rerun with ``resume`` continues from there. Rows go to
``out/akrout-mnist.csv`` (the committed 400-epoch results: ``bench/results/akrout-mnist.csv``).
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.linear import FALinear
from ..metrics import angle_between
from . import datasets
from .files import load_run, replace_rows, save_run

LEARNING_RATES = {"backprop": 0.2, "fa": 0.2, "wm": 0.05, "kp": 0.3}
METHODS = tuple(LEARNING_RATES)
BATCH = 128
SEED = 1111
EPOCHS = 400
COLUMNS = ("method", "epoch", "loss_train", "acc_test", "angle_0", "angle_1", "seconds", "lr", "seed")


def build(method: str, backend: str = "torch", device=None) -> nn.Sequential:
    """784-500-10: sigmoid hidden layer; the output layer's sigmoid is in the loss (logits out)."""
    model = nn.Sequential(FALinear(784, 500, activation="sigmoid", method=method, backend=backend, device=device),
                          FALinear(500, 10, activation="identity", method=method, backend=backend, device=device))
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


def load(data_dir=None, *, download: bool = True, device="cpu", train_samples: int | None = None):
    """MNIST as their code reads it: pixels / 255, flattened; the first ``train_samples`` training images."""
    data = datasets.load("mnist", data_dir, download=download, device=device)
    data = data._replace(x_train=data.x_train.flatten(1), x_test=data.x_test.flatten(1))
    if train_samples:
        data = data._replace(x_train=data.x_train[:train_samples], y_train=data.y_train[:train_samples])
    return data


def run_method(method: str, data, epochs: int, out: Path, *, seed: int = SEED, checkpoint_every: int = 5,
               backend: str = "torch", resume: bool = False, progress: bool = True, echo=print) -> list[dict]:
    """Train ``method`` by their protocol; rows (one per epoch) into ``out/akrout-mnist.csv``,
    checkpoints into ``out/checkpoints``. ``resume``: continue from the checkpoint there."""
    from tqdm.auto import tqdm

    if method not in LEARNING_RATES:
        raise ValueError(f"akrout-mnist has the rules {', '.join(METHODS)}; got {method!r}")
    state_path = out / "checkpoints" / f"akrout-{method}-seed{seed}.pt"
    csv_path = out / "akrout-mnist.csv"
    lr = LEARNING_RATES[method]
    run = {"method": method, "seed": seed, "lr": lr, "train_samples": len(data.x_train)}  # what a resume must match
    torch.manual_seed(seed)
    model = build(method, backend, data.x_train.device)
    weights = [p for name, p in model.named_parameters() if not name.endswith("bias")]  # W (and B for kp)
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    optimizer = torch.optim.SGD([{"params": weights, "lr": lr}, {"params": biases, "lr": lr / BATCH}], lr=lr)
    rows, start = [], 0
    state = load_run(state_path, run) if resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        rows, start = state["rows"], state["epoch"]
        echo(f"{method}: resuming after epoch {start}")
    elif method == "wm":
        for _ in range(len(data.x_train) // BATCH):  # their 468 mirror steps before training
            mirror(model)
    x_train, y_train = data.x_train, data.y_train
    onehot = F.one_hot(y_train, 10).to(x_train.dtype)
    steps = len(x_train) // BATCH
    for epoch in range(start + 1, epochs + 1):
        began = time.perf_counter()
        losses = torch.zeros(steps, device=x_train.device)
        for i in tqdm(range(steps), desc=f"{method} epoch {epoch}/{epochs}", leave=False, disable=not progress):
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
        if not torch.isfinite(losses).all():
            step = int((~torch.isfinite(losses)).nonzero()[0]) + 1
            raise RuntimeError(f"akrout-mnist {method}: the training loss is not finite at epoch {epoch}, step {step}")
        layer_angles = angles(model)
        row = {"method": method, "epoch": epoch, "loss_train": losses.mean().item(),
               "acc_test": accuracy(model, data.x_test, data.y_test), "angle_0": layer_angles[0],
               "angle_1": layer_angles[1], "seconds": seconds, "lr": lr, "seed": seed}
        rows.append(row)
        echo(f"{method} epoch {epoch}: loss {row['loss_train']:.4f} acc_test {row['acc_test']:.2f} "
             f"angles {row['angle_0']:.1f} {row['angle_1']:.1f} ({seconds:.1f} s)")
        if epoch % checkpoint_every == 0 or epoch == epochs:
            replace_rows(csv_path, COLUMNS, rows, key=("method", "seed"))
            save_run(state_path, run, model=model.state_dict(), optimizer=optimizer.state_dict(),
                     rng=torch.get_rng_state(), rows=rows, epoch=epoch)
    return rows


def read_rows(csv_path: Path) -> list[dict]:
    with csv_path.open(newline="") as f:
        return list(csv.DictReader(f))
