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
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.linear import FALinear
from ..metrics import fa_layers, weight_alignment
from ..ops.backends import check_backend, resolve

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


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               idx: torch.Tensor) -> torch.Tensor:
    """One optimizer step on the batch x[idx], y[idx] (cross-entropy); returns the loss (0-d)."""
    loss = F.cross_entropy(model(x[idx]), y[idx])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


class GraphedTrainStep:
    """:func:`train_step` captured whole — forward, loss, backward, optimizer step — in one
    ``torch.cuda.CUDAGraph``, replayed for each batch: one launch instead of dozens per step.

    Call it as ``step(idx)`` with a batch's row indices idx [batch_size] (CUDA, int64): they are
    copied into a static buffer and the graph replays. The first ``warmup`` calls are ordinary
    eager steps on a side stream (they also tune the Triton kernels, which cannot be tuned while
    a graph is captured); the next call captures the step, then replays it, so every call is a
    real training step and the training is the eager one up to rounding. The batch size is
    fixed (incomplete batches are dropped anyway). The optimizer must be built with
    ``capturable=True`` (Adam, AdamW, SGD and the others that have it).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 batch_size: int, warmup: int = 3) -> None:
        if not optimizer.defaults.get("capturable", False):
            raise ValueError(f"CUDA-graph training needs an optimizer built with capturable=True, got "
                             f"{type(optimizer).__name__} without it")
        if not x.is_cuda:
            raise ValueError(f"CUDA-graph training needs the data and model on a CUDA device, got {x.device}; "
                             "use cuda_graph=False (--no-cuda-graph) on the CPU")
        self.model, self.optimizer, self.x, self.y = model, optimizer, x, y
        self.warmup = warmup
        self.steps = 0
        self.idx = torch.zeros(batch_size, dtype=torch.long, device=x.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            if self.steps < self.warmup:
                self.steps += 1
                side = torch.cuda.Stream(device=self.x.device)
                side.wait_stream(torch.cuda.current_stream(self.x.device))
                with torch.cuda.stream(side):
                    loss = train_step(self.model, self.optimizer, self.x, self.y, idx)
                torch.cuda.current_stream(self.x.device).wait_stream(side)
                return loss
            self._capture()
        self.idx.copy_(idx)
        self.graph.replay()
        return self.loss

    def _capture(self) -> None:
        # Gradients set to None now are allocated by the captured backward in the graph's memory
        # pool; each replay then writes them afresh (no accumulation across steps).
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = F.cross_entropy(self.model(self.x[self.idx]), self.y[self.idx])
            self.loss.backward()
            self.optimizer.step()


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                indices: torch.Tensor, progress=None, step=None) -> None:
    """One pass of optimizer steps on the batches x[indices[i]] (indices [n_batches, batch], on x's device).

    ``step``: a :class:`GraphedTrainStep` to run each batch through (default: eager
    :func:`train_step`). ``progress`` is a tqdm bar (or None): it is advanced once per batch.
    """
    for i, idx in enumerate(indices):
        loss = step(idx) if step is not None else train_step(model, optimizer, x, y, idx)
        if progress is not None:
            progress.update(1)
            if i % 50 == 0:  # .item() synchronises a GPU: not every step
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


def _check_train_arguments(epochs, lr, batch_size, seed, train_samples, test_samples, backend) -> None:
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


def _use_cuda_graph(cuda_graph: bool | None, device: torch.device, world_size: int) -> bool:
    """Whether to capture the training step: by default on CUDA with one process."""
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be True, False or None, got {cuda_graph!r}")
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs device='cuda', got device {str(device)!r}; CUDA graphs capture GPU "
                         "work only (use cuda_graph=False or None on the CPU)")
    if world_size > 1:
        if cuda_graph:
            warnings.warn("cuda_graph=True is not supported with several processes (DistributedDataParallel's "
                          "gradient all-reduce runs outside the captured step): training eagerly", stacklevel=3)
        return False
    return device.type == "cuda" if cuda_graph is None else cuda_graph


def _wrap_ddp(model: nn.Module, layers: list, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel, with rank 0's feedback matrices on every rank."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    with torch.no_grad():
        for layer in layers:  # the feedback state (B, R, brsf's seed and counter) comes from rank 0
            for buffer in layer.buffers(recurse=False):
                dist.broadcast(buffer, src=0)
            if layer.method == "kp":
                dist.broadcast(layer.feedback, src=0)
            if layer.method == "brsf":
                layer.sync_seed()
    # DDP broadcasts rank 0's parameters once here. Feedback never changes, so buffers need no
    # re-broadcast every forward (the option's name changed in recent PyTorch).
    options = {"device_ids": [device.index] if device.type == "cuda" else None}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        options["forward_sync_buffers"] = False
    else:
        options["broadcast_buffers"] = False
    return DistributedDataParallel(model, **options)


def _epoch_row(epoch: int, seconds: float, model: nn.Module, layers: list, data: MNISTTensors,
               batch_size: int) -> dict:
    """The table's row after an epoch: losses and accuracies (eval mode), seconds, angles."""
    model.eval()
    loss_train, acc_train = evaluate(model, data.x_train, data.y_train, batch_size)
    loss_test, acc_test = evaluate(model, data.x_test, data.y_test, batch_size)
    row = {"epoch": epoch, "loss_train": loss_train, "loss_test": loss_test, "acc_train": acc_train,
           "acc_test": acc_test, "seconds": seconds}
    for i, layer in enumerate(layers, start=1):
        row[f"angle_{i}"] = weight_alignment(layer).angle
    return row


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
    cuda_graph: bool | None = None,
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
        cuda_graph: capture the whole training step in a CUDA graph (:class:`GraphedTrainStep`;
            Adam with ``capturable=True``). None (default): on CUDA with one process. True on
            the CPU is an error; with several processes training is eager (with a warning).

    Same seed, device and backend give the same table: the seed sets torch's RNG before the
    model is built and a separate generator that shuffles the batches; the graphed and the
    eager loop train alike up to rounding. Under ``torchrun`` (``WORLD_SIZE`` > 1; gloo on CPU,
    nccl on CUDA) ``batch_size`` is the global batch, split evenly over the processes; rank 0's
    feedback matrices and weights are broadcast to all ranks, every rank ends with identical
    weights and returns the same table.
    """
    import pandas as pd
    import torch.distributed as dist
    from tqdm.auto import tqdm

    _check_train_arguments(epochs, lr, batch_size, seed, train_samples, test_samples, backend)
    rank, world_size, local_rank = _distributed_env()
    if world_size > 1 and batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} must be divisible by the number of processes ({world_size})")
    device = resolve_device(device)
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    graphed = _use_cuda_graph(cuda_graph, device, world_size)
    # Fails now, with the reason, if the backend cannot run on this device (e.g. triton on CPU
    # without TRITON_INTERPRET=1), rather than inside the first training step.
    resolve(backend, torch.empty(0, device=device))

    own_group = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        own_group = True
    try:
        data = _load_on_all_ranks(data_dir, download, device, rank, world_size)
        data = MNISTTensors(data.x_train[:train_samples], data.y_train[:train_samples],
                            data.x_test[:test_samples], data.y_test[:test_samples])
        torch.manual_seed(seed)
        model = (build_model(backend=backend) if model is None else model).to(device)
        layers = fa_layers(model)
        if not layers:
            raise ValueError(f"model has no FALinear layer: {type(model).__name__}")
        train_model = _wrap_ddp(model, layers, device) if world_size > 1 else model
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, **({"capturable": True} if graphed else {}))
        step = GraphedTrainStep(model, optimizer, data.x_train, data.y_train, batch_size) if graphed else None
        generator = torch.Generator().manual_seed(seed)

        rows = []
        for epoch in range(1, epochs + 1):
            indices = batch_indices(len(data.x_train), batch_size, generator, rank=rank, world_size=world_size)
            indices = indices.to(device)
            bar = tqdm(total=len(indices), desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False,
                       disable=not progress or rank != 0)
            model.train()
            _synchronize(device)
            start = time.perf_counter()
            train_epoch(train_model, optimizer, data.x_train, data.y_train, indices, progress=bar, step=step)
            _synchronize(device)
            seconds = time.perf_counter() - start
            bar.close()
            rows.append(_epoch_row(epoch, seconds, model, layers, data, batch_size))
            if progress and rank == 0:
                tqdm.write(f"epoch {epoch}: loss_test {rows[-1]['loss_test']:.3f} acc_test {rows[-1]['acc_test']:.3f} "
                           f"({seconds:.1f} s)")
        if world_size > 1:
            _check_ranks_agree(model)
    finally:
        if own_group:
            dist.destroy_process_group()
    return pd.DataFrame(rows)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
