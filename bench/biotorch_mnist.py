"""BioTorch's MNIST table with fa_triton's layers: LeNet trained by BP, FA, DFA, uSF, brSF and frSF.

    python3 bench/biotorch_mnist.py --data-dir ../shared/data                  # 10 epochs, lr /10 at 5, 8
    python3 bench/biotorch_mnist.py --data-dir ../shared/data --epochs 100 --milestones 50,75   # theirs
    python3 bench/biotorch_mnist.py --data-dir ../shared/data --select-lr        # choose each method's lr

Their protocol (``jsalbert/biotorch``, ``Benchmarks.md``, ``datasets/mnist.py``): images resized
to 32×32 and normalized (mean 0.1307, std 0.3081), BioTorch's LeNet (``fa_triton.models.lenet``),
xavier init, SGD with momentum 0.9 and weight decay 1e-3, batch 64 (shuffled, incomplete batch
dropped), 100 epochs with the learning rate divided by 10 at epochs 50 and 75, cross-entropy; the
10k test set serves as validation, and they report the test error of the best-validation epoch.
Their top-1 error (%): BP 0.91, FA 1.70, DFA 1.61, uSF 0.94, brSF 0.91, frSF 0.97.

They did not publish their MNIST learning rates. ``--select-lr`` chooses one per method on a
validation split of the training set (the last 5,000 training images held out, ``--select-epochs``
epochs per candidate of ``--lr-candidates``) and writes the choice to ``--lr-file``; training then
uses it. Rows (one per method and epoch: train loss, test error, learning rate) go to ``--csv``;
each method's state is checkpointed every epoch under ``--state-dir`` and a rerun resumes it.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fa_triton import models
from fa_triton.experiments.mnist import load_mnist

from .checkpoint import load_run, save_run
from .results import replace_rows

METHODS = ("backprop", "fa", "dfa", "usf", "brsf", "frsf")
THEIRS = {"backprop": 0.91, "fa": 1.70, "dfa": 1.61, "usf": 0.94, "brsf": 0.91, "frsf": 0.97}
COLUMNS = ("method", "epoch", "lr", "loss_train", "error_test", "seconds", "epochs_planned", "seed")


def mnist_32(data_dir) -> tuple[torch.Tensor, ...]:
    """MNIST resized to 32×32 (bilinear, antialiased, as torchvision's Resize) and normalized."""
    from torchvision.transforms.functional import resize

    data = load_mnist(data_dir, download=False)

    def prepare(x):
        images = (x.view(-1, 1, 28, 28) * 255).round()
        resized = resize(images, [32, 32], antialias=True)
        return (resized / 255 - 0.1307) / 0.3081

    return prepare(data.x_train), data.y_train, prepare(data.x_test), data.y_test


@torch.no_grad()
def error_rate(model, x, y, chunk=2000) -> float:
    model.eval()
    wrong = sum((model(x[i:i + chunk]).argmax(1) != y[i:i + chunk]).sum().item() for i in range(0, len(x), chunk))
    model.train()
    return 100.0 * wrong / len(x)


def train_method(method, lr, x_train, y_train, x_val, y_val, epochs, milestones, seed, state_path=None,
                 progress=True, on_epoch=None):
    """Train LeNet with ``method``; returns the rows (one per epoch). Resumes from ``state_path``."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = models.lenet(method, init="xavier", backend="torch")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    generator = torch.Generator().manual_seed(seed)
    rows, start = [], 0
    run = {"method": method, "lr": lr, "epochs": epochs, "milestones": list(milestones), "seed": seed,
           "train_samples": len(x_train)}  # what a resume must match
    state = load_run(state_path, run)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["rng"])
        rows, start = state["rows"], state["epoch"]
    steps = len(x_train) // 64
    for epoch in range(start + 1, epochs + 1):
        began = time.perf_counter()
        order = torch.randperm(len(x_train), generator=generator)[:steps * 64].view(steps, 64)
        total = torch.zeros(())
        for idx in tqdm(order, desc=f"{method} epoch {epoch}/{epochs}", leave=False, disable=not progress):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        used_lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        row = {"method": method, "epoch": epoch, "lr": used_lr, "loss_train": (total / steps).item(),
               "error_test": error_rate(model, x_val, y_val), "seconds": time.perf_counter() - began,
               "epochs_planned": epochs, "seed": seed}
        rows.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if state_path is not None:
            save_run(state_path, run, model=model.state_dict(), optimizer=optimizer.state_dict(),
                     scheduler=scheduler.state_dict(), generator=generator.get_state(), rng=torch.get_rng_state(),
                     rows=rows, epoch=epoch)
    return rows


def select_lr(method, candidates, x_train, y_train, epochs, seed) -> tuple[float, dict]:
    """The candidate with the lowest error on the last 5,000 training images, trained on the rest."""
    if len(x_train) <= 2 * 5000:
        raise SystemExit(f"error: --select-lr holds out 5,000 training images and needs more than 10,000; "
                         f"got {len(x_train)} (--train-samples)")
    fit_x, fit_y, val_x, val_y = x_train[:-5000], y_train[:-5000], x_train[-5000:], y_train[-5000:]
    errors = {}
    for lr in candidates:
        rows = train_method(method, lr, fit_x, fit_y, val_x, val_y, epochs, [], seed, progress=False)
        errors[lr] = rows[-1]["error_test"]
        print(f"  {method} lr {lr:g}: validation error {errors[lr]:.2f}%", flush=True)
    return min(errors, key=errors.get), errors


def summary(path: Path, epochs: int) -> list[str]:
    """Ours beside theirs: the test error of the best-validation epoch (theirs) and of the last."""
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["epochs_planned"]) == epochs]
    lines = [f"LeNet on MNIST, {epochs} epochs: test error % (ours best-validation epoch / final epoch; theirs)"]
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        best = min(mine, key=lambda r: float(r["error_test"]))
        last = max(mine, key=lambda r: int(r["epoch"]))
        lines.append(f"  {method:9s} {float(best['error_test']):5.2f} (epoch {best['epoch']:>3s}) / "
                     f"{float(last['error_test']):5.2f} (epoch {last['epoch']:>3s})   theirs {THEIRS[method]:.2f}"
                     f"   lr {float(mine[0]['lr']):g}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--milestones", default="5,8", help="epochs after which the lr is divided by 10")
    parser.add_argument("--seed", type=int, default=2021)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--select-lr", action="store_true", help="choose each method's lr first (see above)")
    parser.add_argument("--lr-candidates", default="0.1,0.03,0.01,0.003,0.001,0.0001")
    parser.add_argument("--select-epochs", type=int, default=2)
    parser.add_argument("--lr-file", default="bench/results/biotorch-mnist-lr.json")
    parser.add_argument("--csv", default="bench/results/biotorch-mnist.csv")
    parser.add_argument("--state-dir", default="runs/biotorch-mnist")
    parser.add_argument("--train-samples", type=int, default=None, help="first N training images (quick runs)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"error: --methods got {bad}; choose from {list(METHODS)}")
    x_train, y_train, x_test, y_test = mnist_32(args.data_dir)
    if args.train_samples:
        x_train, y_train = x_train[:args.train_samples], y_train[:args.train_samples]
    lr_path = Path(args.lr_file)
    chosen = json.loads(lr_path.read_text()) if lr_path.exists() else {}
    if args.select_lr:
        candidates = [float(v) for v in args.lr_candidates.split(",")]
        for method in methods:
            lr, errors = select_lr(method, candidates, x_train, y_train, args.select_epochs, args.seed)
            chosen[method] = {"lr": lr, "validation_error": errors, "epochs": args.select_epochs}
            lr_path.parent.mkdir(parents=True, exist_ok=True)
            lr_path.write_text(json.dumps(chosen, indent=2))
            print(f"{method}: lr {lr:g}", flush=True)
    state_dir, csv_path = Path(args.state_dir), Path(args.csv)
    state_dir.mkdir(parents=True, exist_ok=True)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    milestones = [int(v) for v in args.milestones.split(",") if v]
    for method in methods:
        if method not in chosen:
            raise SystemExit(f"error: no learning rate for {method}: run with --select-lr first (or edit {lr_path})")
        lr = chosen[method]["lr"]
        state = state_dir / f"{method}-{args.epochs}ep-seed{args.seed}.pt"

        def report(row):
            print(f"{row['method']} epoch {row['epoch']}: loss {row['loss_train']:.4f} test error "
                  f"{row['error_test']:.2f}% ({row['seconds']:.0f} s)", flush=True)

        rows = train_method(method, lr, x_train, y_train, x_test, y_test, args.epochs, milestones, args.seed,
                            state, progress=not args.no_progress, on_epoch=report)
        replace_rows(csv_path, COLUMNS, rows, key=("method", "epoch", "epochs_planned", "seed"))
    print("\n".join(summary(csv_path, args.epochs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
