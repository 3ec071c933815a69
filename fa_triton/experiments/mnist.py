"""The founding tutorial: an MLP trained on MNIST by feedback alignment in every layer.

784-128-64-10 (relu, relu, identity), Adam lr 3e-4, batch 64 shuffled with incomplete batches
dropped, logit cross-entropy; after each epoch, loss and accuracy on the train and test sets
(means over the images) and the W-B angle of every layer. :func:`train` returns the table as a
``pandas.DataFrame``. It is the runner's default experiment (``fa_triton.experiments.runner``,
``fa-triton train`` with no model, method or dataset given), trained by the same loop.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple, Sequence

import torch
from torch import nn

from .. import models
from ..ops.backends import check_backend
from . import datasets
from .datasets import MissingDataError, default_data_dir  # noqa: F401 - importable from here as before
from .report import format_table, plot_training  # noqa: F401 - importable from here as before
from .training import (  # noqa: F401 - the tutorial's loop, importable from here as before
    GraphedForward,
    GraphedTrainStep,
    batch_indices,
    evaluate,
    resolve_device,
    train_epoch,
    train_step,
)
from .training import mean_over_batches as _mean_over_batches  # noqa: F401
from .training import use_cuda_graph as _use_cuda_graph  # noqa: F401

if TYPE_CHECKING:
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
TABLE_COLUMNS = ("epoch", "loss_train", "loss_test", "acc_train", "acc_test", "seconds")
"""The table's columns, then ``angle_1`` ... ``angle_L``."""


class MNISTTensors(NamedTuple):
    x_train: torch.Tensor
    """[60000, 784] float32, pixels / 255."""
    y_train: torch.Tensor
    """[60000] int64 class labels."""
    x_test: torch.Tensor
    """[10000, 784] float32."""
    y_test: torch.Tensor
    """[10000] int64."""


def build_model(
    sizes: Sequence[int] = DEFAULT_SIZES,
    activations: Sequence[str] = DEFAULT_ACTIVATIONS,
    *,
    bias: bool = True,
    backend: str = "auto",
    method: str = "fa",
    init: str = "kaiming",
    device=None,
    dtype=None,
) -> nn.Sequential:
    """The tutorial's MLP, one :class:`FALinear` per layer: [..., sizes[0]] -> [..., sizes[-1]] logits
    (``fa_triton.models.mlp`` with the tutorial's sizes and activations as defaults)."""
    return models.mlp(sizes, activations, bias=bias, backend=backend, method=method, init=init, device=device,
                      dtype=dtype)


def load_mnist(data_dir=None, *, download: bool = True, device="cpu") -> MNISTTensors:
    """MNIST as tensors on ``device``: images flattened to 784 and scaled to [0, 1] (pixels / 255).

    ``data_dir`` is torchvision's root (the folder holding ``MNIST/raw/``), default
    :func:`default_data_dir`; the MNIST folder itself is accepted too. Raises
    :class:`MissingDataError` (one line, naming the folder and the files) when the files are
    absent and ``download`` is False or the download fails (``datasets.load``).
    """
    data = datasets.load("mnist", data_dir, download=download, device=device)
    return MNISTTensors(data.x_train.flatten(1), data.y_train, data.x_test.flatten(1), data.y_test)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")



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
    accuracies are evaluated after the epoch on the full train and test sets (means over the
    images); ``seconds`` is the wall time of the epoch's training steps.

    Args:
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        backend: the FALinear backend (``"auto"``: timed per step on CUDA, the PyTorch reference on CPU).
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
    weights and returns the same table. Nothing is written to disk.
    """
    from .config import RunConfig
    from .runner import run

    _check_train_arguments(epochs, lr, batch_size, seed, train_samples, test_samples, backend)
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be True, False or None, got {cuda_graph!r}")
    config = RunConfig(epochs=epochs, lr=float(lr), batch_size=batch_size, seeds=(seed,), device=str(device),
                       backend=backend, data_dir=None if data_dir is None else str(data_dir), download=download,
                       progress=progress, train_samples=train_samples, test_samples=test_samples,
                       cuda_graph=cuda_graph, validation="none")
    df = run(config, model=model, write=False)
    return df[[*TABLE_COLUMNS, *[c for c in df.columns if c.startswith("angle_")]]]
