"""The founding tutorial: an MLP trained on MNIST by feedback alignment in every layer.

784-128-64-10 (relu, relu, identity), Adam lr 3e-4, batch 64 shuffled with incomplete batches
dropped, logit cross-entropy; after each epoch, loss and accuracy on the train and test sets
(mean over batches) and the W-B angle of every layer. :func:`train` returns the table as a
``pandas.DataFrame``; ``fa-triton train`` (``fa_triton.cli``) is the command-line front end.

The whole dataset is held as two tensors on the training device and batched by indexing, so
the training loop does no per-sample Python work. Under ``torchrun`` (``WORLD_SIZE`` > 1) the
same :func:`train` runs data-parallel with ``DistributedDataParallel``.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .metrics import fa_layers, weight_alignment
from .modules import FALinear
from .backend import check_backend, resolve_backend

if TYPE_CHECKING:  # pandas is an optional dependency (the "train" extra)
    import pandas

DEFAULT_SIZES = (784, 128, 64, 10)
DEFAULT_ACTIVATIONS = ("relu", "relu", "identity")
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
METRIC_COLUMNS = ("loss_train", "loss_test", "acc_train", "acc_test")


class MissingDataError(FileNotFoundError):
    """MNIST is not in the data folder and could not be downloaded."""


class MNISTTensors(NamedTuple):
    x_train: torch.Tensor
    """[60000, 784] float32, pixels / 255."""
    y_train: torch.Tensor
    """[60000] int64 class labels."""
    x_test: torch.Tensor
    """[10000, 784] float32."""
    y_test: torch.Tensor
    """[10000] int64."""


def default_data_dir() -> Path:
    """Where MNIST is looked for (and downloaded to) without ``data_dir``: ``$XDG_CACHE_HOME/fa_triton``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "fa_triton"


def build_model(
    sizes: Sequence[int] = DEFAULT_SIZES,
    activations: Sequence[str] = DEFAULT_ACTIVATIONS,
    *,
    bias: bool = True,
    backend: str = "auto",
    device=None,
    dtype=None,
) -> nn.Sequential:
    """The tutorial's MLP, one :class:`FALinear` per layer: [..., sizes[0]] -> [..., sizes[-1]] logits.

    ``activations[i]`` follows layer i (default relu, relu, identity), so
    ``len(activations) == len(sizes) - 1``.
    """
    sizes, activations = list(sizes), list(activations)
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least an input and an output size, got {sizes}")
    if len(activations) != len(sizes) - 1:
        raise ValueError(
            f"activations must have one entry per layer (len(sizes) - 1 = {len(sizes) - 1}), "
            f"got {len(activations)}: {activations}"
        )
    return nn.Sequential(*(
        FALinear(n_in, n_out, bias=bias, activation=act, backend=backend, device=device, dtype=dtype)
        for n_in, n_out, act in zip(sizes[:-1], sizes[1:], activations)
    ))


def _missing_data_message(root: Path, reason: str) -> str:
    # One line: the CLI prints it as its whole error message.
    return (
        f"MNIST not found: expected the files {', '.join(MNIST_FILES)} in {root / 'MNIST' / 'raw'} ({reason}); "
        "pass --data-dir DIR (train(data_dir=DIR)) for a folder that holds MNIST/raw/ with these files"
    )


def _resolve_data_root(data_dir) -> Path:
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    # Accept the MNIST folder itself as well as torchvision's root above it.
    if not (root / "MNIST").is_dir() and root.name == "MNIST" and (root / "raw").is_dir():
        root = root.parent
    return root


def load_mnist(data_dir=None, *, download: bool = True, device="cpu") -> MNISTTensors:
    """MNIST as tensors on ``device``: images flattened to 784 and scaled to [0, 1] (pixels / 255).

    ``data_dir`` is torchvision's root (the folder holding ``MNIST/raw/``), default
    :func:`default_data_dir`. Raises :class:`MissingDataError` when the files are absent and
    ``download`` is False or the download fails.
    """
    try:
        from torchvision.datasets import MNIST
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise RuntimeError(
            f"the MNIST job needs torchvision: python3 -m pip install -e \".[train]\" ({err})"
        ) from err
    root = _resolve_data_root(data_dir)
    tensors = []
    for train in (True, False):
        try:
            dataset = MNIST(root=str(root), train=train, download=download)
        except Exception as err:  # torchvision raises RuntimeError, URLError or OSError here
            reason = "download failed: " + " ".join(str(err).split()) if download else "download=False"
            raise MissingDataError(_missing_data_message(root, reason)) from err
        x = dataset.data.reshape(len(dataset.data), -1).to(device=device, dtype=torch.float32) / 255
        tensors += [x, dataset.targets.to(device=device, dtype=torch.long)]
    return MNISTTensors(*tensors)


def resolve_device(device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is checked and returned as a device."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from err
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use device='cpu'")
    return resolved


def _mean_over_batches(values: torch.Tensor, batch_size: int) -> float:
    """Mean of the per-batch means of ``values`` [n] in batches of ``batch_size`` (the last one may be short)."""
    n_full = values.numel() // batch_size
    means = values[: n_full * batch_size].view(n_full, batch_size).mean(1)
    if values.numel() % batch_size:
        means = torch.cat([means, values[n_full * batch_size:].mean().reshape(1)])
    return means.mean().item()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64,
             chunk: int = 10_000) -> tuple[float, float]:
    """(loss, accuracy) of ``model`` on x [n, 784], y [n]: means over batches of ``batch_size``, as the tutorial.

    The forward passes run ``chunk`` rows at a time (the per-batch means come out the same).
    """
    losses, correct = [], []
    for start in range(0, len(x), chunk):
        logits = model(x[start:start + chunk])
        target = y[start:start + chunk]
        losses.append(F.cross_entropy(logits.float(), target, reduction="none"))
        correct.append((logits.argmax(1) == target).float())
    return _mean_over_batches(torch.cat(losses), batch_size), _mean_over_batches(torch.cat(correct), batch_size)


def batch_indices(n: int, batch_size: int, generator: torch.Generator, *, rank: int = 0,
                  world_size: int = 1) -> torch.Tensor:
    """One shuffled epoch: [n // batch_size, batch_size // world_size] row indices for this rank.

    Incomplete batches are dropped. With several processes each global batch is split into
    equal contiguous shards, one per rank, so that DDP's gradient average over the ranks is the
    gradient of the whole batch: the same training as one process, up to rounding.
    """
    n_batches = n // batch_size
    perm = torch.randperm(n, generator=generator)[: n_batches * batch_size]
    return perm.view(n_batches, world_size, batch_size // world_size)[:, rank]


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                indices: torch.Tensor, progress=None) -> None:
    """One pass of Adam steps on the batches x[indices[i]] (indices [n_batches, batch], on x's device).

    ``progress`` is a tqdm bar (or None): it is advanced once per batch.
    """
    for step, idx in enumerate(indices):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress.update(1)
            if step % 50 == 0:  # .item() synchronises a GPU: not every step
                progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank): from the process group if one is up, else torchrun's variables."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0"))


def _load_on_all_ranks(data_dir, download: bool, device: torch.device, rank: int, world_size: int) -> MNISTTensors:
    """Rank 0 loads (and downloads if needed) first, so that ranks never download into one folder at once."""
    if world_size == 1:
        return load_mnist(data_dir, download=download, device=device)
    import torch.distributed as dist

    error = None
    if rank == 0:
        try:
            data = load_mnist(data_dir, download=download, device=device)
        except Exception as err:  # the other ranks must hear of any failure, or they wait forever
            error = err
    flag = torch.tensor([0 if error is None else 1], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(flag, src=0)
    if rank == 0 and error is not None:
        raise error
    if flag.item():
        raise MissingDataError(_missing_data_message(_resolve_data_root(data_dir), "rank 0 could not load it"))
    if rank != 0:
        data = load_mnist(data_dir, download=False, device=device)
    return data


def _check_ranks_agree(model: nn.Module) -> None:
    """Raise if any rank's parameters or buffers differ from rank 0's (DDP should keep them bitwise equal)."""
    import torch.distributed as dist

    flat = torch.cat([t.detach().reshape(-1).float() for t in (*model.parameters(), *model.buffers())])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    for other_rank, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            raise RuntimeError(f"after training, rank {other_rank}'s weights differ from rank 0's")


def train(
    epochs: int = 10,
    lr: float = 3e-4,
    batch_size: int = 64,
    seed: int = 0,
    device="auto",
    backend: str = "auto",
    data_dir=None,
    download: bool = True,
    progress: bool = True,
    *,
    train_samples: int | None = None,
    test_samples: int | None = None,
    model: nn.Module | None = None,
) -> "pandas.DataFrame":
    """Train the tutorial's FA MLP on MNIST and return one row per epoch.

    Columns: ``epoch, loss_train, loss_test, acc_train, acc_test, seconds`` and ``angle_1`` ...
    ``angle_L``, the W-B angle (degrees) of each FALinear layer after the epoch. Losses and
    accuracies are evaluated after the epoch on the full train and test sets (means over
    batches of ``batch_size``); ``seconds`` is the wall time of the epoch's training steps.

    Args:
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        backend: the FALinear backend (``"auto"``: Triton on CUDA, the PyTorch reference on CPU).
        data_dir: torchvision's MNIST root (holding ``MNIST/raw/``); default :func:`default_data_dir`.
        download: fetch MNIST into ``data_dir`` when it is missing.
        progress: a tqdm bar over the batches of each epoch (rank 0 only).
        train_samples, test_samples: use only the first N images of each set (quick runs, tests).
        model: train this module in place instead of ``build_model(backend=backend)``.

    Same seed, device and backend give the same table: the seed sets torch's RNG before the
    model is built and a separate generator that shuffles the batches. Under ``torchrun``
    (``WORLD_SIZE`` > 1; gloo on CPU, nccl on CUDA) ``batch_size`` is the global batch, split
    evenly over the processes; rank 0's feedback matrices and weights are broadcast to all
    ranks, every rank ends with identical weights and returns the same table.
    """
    import pandas as pd
    import torch.distributed as dist
    from tqdm.auto import tqdm

    _check_positive_int("epochs", epochs)
    _check_positive_int("batch_size", batch_size)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    for name, value in (("train_samples", train_samples), ("test_samples", test_samples)):
        if value is not None:
            _check_positive_int(name, value)
    if train_samples is not None and train_samples < batch_size:
        raise ValueError(f"train_samples={train_samples} holds no complete batch of batch_size={batch_size}")
    check_backend(backend)
    rank, world_size, local_rank = _distributed_env()
    if world_size > 1 and batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} must be divisible by the number of processes ({world_size})")
    device = resolve_device(device)
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # Fails now, with the reason, if the backend cannot run on this device (e.g. triton on CPU
    # without TRITON_INTERPRET=1), rather than inside the first training step.
    resolve_backend(backend, torch.empty(0, device=device))

    own_group = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        own_group = True
    try:
        data = _load_on_all_ranks(data_dir, download, device, rank, world_size)
        x_train, y_train = data.x_train[:train_samples], data.y_train[:train_samples]
        x_test, y_test = data.x_test[:test_samples], data.y_test[:test_samples]

        torch.manual_seed(seed)
        if model is None:
            model = build_model(backend=backend)
        model = model.to(device)
        layers = fa_layers(model)
        if not layers:
            raise ValueError(f"model has no FALinear layer: {type(model).__name__}")
        train_model = model
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            with torch.no_grad():
                for layer in layers:  # the fixed feedback matrices come from rank 0
                    dist.broadcast(layer.feedback, src=0)
            # DDP broadcasts rank 0's parameters once here. Feedback never changes, so buffers need
            # no re-broadcast every forward (the option's name changed in recent PyTorch).
            options = {"device_ids": [device.index] if device.type == "cuda" else None}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
                options["forward_sync_buffers"] = False
            else:
                options["broadcast_buffers"] = False
            train_model = DistributedDataParallel(model, **options)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(seed)

        rows = []
        for epoch in range(1, epochs + 1):
            indices = batch_indices(len(x_train), batch_size, generator, rank=rank, world_size=world_size)
            indices = indices.to(device)
            bar = tqdm(total=len(indices), desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False,
                       disable=not progress or rank != 0)
            model.train()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            train_epoch(train_model, optimizer, x_train, y_train, indices, progress=bar)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            bar.close()

            model.eval()
            loss_train, acc_train = evaluate(model, x_train, y_train, batch_size)
            loss_test, acc_test = evaluate(model, x_test, y_test, batch_size)
            row = {"epoch": epoch, "loss_train": loss_train, "loss_test": loss_test,
                   "acc_train": acc_train, "acc_test": acc_test, "seconds": seconds}
            for i, layer in enumerate(layers, start=1):
                row[f"angle_{i}"] = weight_alignment(layer).angle
            rows.append(row)
            if progress and rank == 0:
                tqdm.write(f"epoch {epoch}: loss_test {loss_test:.3f} acc_test {acc_test:.3f} "
                           f"({seconds:.1f} s)")
        if world_size > 1:
            _check_ranks_agree(model)
    finally:
        if own_group:
            dist.destroy_process_group()
    return pd.DataFrame(rows)


def format_table(df: "pandas.DataFrame", digits: int = 3) -> str:
    """The table as the tutorial prints it: indexed by epoch, numbers rounded to ``digits``."""
    return df.set_index("epoch").to_string(float_format=lambda value: f"{value:.{digits}f}")


def plot_training(df: "pandas.DataFrame", path) -> None:
    """Write loss, accuracy and W-B angle per epoch (three panels) to ``path`` (a PNG)."""
    # A bare Figure rather than pyplot: no display needed, and the caller's backend is left alone.
    from matplotlib.figure import Figure

    angle_columns = [c for c in df.columns if c.startswith("angle_")]
    fig = Figure(figsize=(13, 3.8))
    ax_loss, ax_acc, ax_angle = fig.subplots(1, 3)
    for split, style in (("train", "-o"), ("test", "--s")):
        ax_loss.plot(df["epoch"], df[f"loss_{split}"], style, label=split, markersize=4)
        ax_acc.plot(df["epoch"], df[f"acc_{split}"], style, label=split, markersize=4)
    for column in angle_columns:
        ax_angle.plot(df["epoch"], df[column], "-o", label=f"layer {column.split('_')[1]}", markersize=4)
    ax_angle.axhline(90, color="grey", linewidth=0.8, linestyle=":")
    for ax, title in ((ax_loss, "cross-entropy loss"), (ax_acc, "accuracy"), (ax_angle, "angle(W, B) [degrees]")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
