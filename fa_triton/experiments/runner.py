"""The experiment runner behind ``fa-triton train``: any model, rule, dataset and seeds (:class:`RunConfig`).

For each seed: the model is built after ``torch.manual_seed(seed)``, the batches are shuffled
by a generator seeded with it, and after every epoch the model is evaluated (eval mode) on the
training, validation (where held out) and test sets (mean cross-entropy and fraction right,
over the images), with the W-B angle and the gradient's angle to backprop's of each FA layer
where the rule has them. Into ``out``:

- ``metrics.csv``: one row per seed and epoch (method, model, dataset, seed, epoch, lr,
  loss/acc per split, seconds, ``angle_i``, ``grad_angle_i``), rewritten after every epoch;
- ``checkpoints/seed{S}.pt`` after every epoch (model, optimizer, schedule, every RNG, rows), so
  that ``resume=True`` continues exactly (bitwise on the CPU) where a run stopped;
- ``config.toml`` (the resolved config), ``summary.csv`` (mean ± std over seeds) and ``training.png``.

Nothing is written before the first epoch ends, so a run that fails early leaves nothing
behind. A non-finite loss stops the run (:class:`NonFiniteLoss`, naming the epoch and step);
the last good checkpoint stays. Under ``torchrun`` the same code runs data-parallel; rank 0
writes.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from ..layers.dfa_network import DFANetwork
from ..metrics import fa_layers, gradient_alignment, weight_alignment
from ..ops.backends import resolve
from . import datasets
from .config import MODELS, RunConfig
from .files import load_run, save_run
from .training import (
    GraphedTrainStep,
    batch_indices,
    check_ranks_agree,
    distributed_env,
    evaluate,
    optimizer_step,
    resolve_device,
    synchronize,
    use_cuda_graph,
    wrap_ddp,
)

if TYPE_CHECKING:
    import pandas

MLP_HIDDEN = (128, 64)
MLP_ACTIVATIONS = ("relu", "relu", "identity")
MIN_STEPS = {"backprop": 100}
"""Fewer optimizer steps than this (all epochs together) draw a warning: feedback alignment
must first align W with B before it learns, so its rules need more steps than backprop
(``MIN_STEPS_FA`` for every rule not listed). Measured on the tutorial's MLP (MNIST, CPU):
after 100 steps FA is at 0.33 test accuracy and backprop at 0.73; after 310, 0.77 and 0.84."""
MIN_STEPS_FA = 1000
CHECK_EVERY = 50
"""On CUDA, the loss is checked for NaN/Inf every this many steps (each check waits for the GPU)."""
OUTPUTS = ("metrics.csv", "summary.csv", "training.png", "config.toml")


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the message names the epoch and the step."""


class RunData(NamedTuple):
    """A dataset prepared for one model, on the training device."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor | None
    y_val: torch.Tensor | None
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    in_channels: int


# ----------------------------------------------------------------------------------------- data

def input_form(model: str) -> str:
    """How a model takes the images: "flat" (mlp: pixels in [0, 1], flattened: the tutorial's),
    "biotorch" (lenet, resnets: resized to 32×32 and normalized per channel, as BioTorch), or
    "image" (a factory's model: normalized, at the dataset's size, [N, C, H, W])."""
    if model == "mlp":
        return "flat"
    return "biotorch" if model in ("lenet", "resnet20", "resnet56") else "image"


def _prepare(x: torch.Tensor, config: RunConfig) -> torch.Tensor:
    form = input_form(config.model)
    if form == "flat":
        return x.reshape(len(x), -1)
    if form == "biotorch" and x.shape[-1] != 32:
        x = datasets.resize32(x)
    return datasets.normalize(x, config.dataset)


def _validation_split(config: RunConfig, n_train: int) -> torch.Tensor | None:
    if config.validation == "none":
        return None
    if config.validation == "auto":
        return datasets.validation_indices(config.dataset, n_train)
    if config.validation >= n_train:
        raise ValueError(f"validation={config.validation} holds out every training image (there are {n_train})")
    return torch.arange(n_train - config.validation, n_train)


def load_data(config: RunConfig, device: torch.device, rank: int = 0, world_size: int = 1) -> RunData:
    """The config's dataset for its model on ``device``: validation split, then the first
    ``train_samples`` / ``test_samples`` images. Under several processes rank 0 reads (and
    downloads) first, so that ranks never download into one folder at once."""
    raw = _load_on_all_ranks(config, rank, world_size)
    x_train, y_train = raw.x_train, raw.y_train
    x_val = y_val = None
    held_out = _validation_split(config, len(x_train))
    if held_out is not None:
        keep = torch.ones(len(x_train), dtype=torch.bool)
        keep[held_out] = False
        x_val, y_val = x_train[held_out], y_train[held_out]
        x_train, y_train = x_train[keep], y_train[keep]
    x_train, y_train = x_train[:config.train_samples], y_train[:config.train_samples]
    x_test, y_test = raw.x_test[:config.test_samples], raw.y_test[:config.test_samples]
    if config.train_samples is not None and len(x_train) < config.batch_size:
        raise ValueError(f"{len(x_train)} training images hold no complete batch of batch_size={config.batch_size}")

    def put(x):
        return None if x is None else _prepare(x, config).to(device)

    def labels(y):
        return None if y is None else y.to(device)

    return RunData(put(x_train), labels(y_train), put(x_val), labels(y_val), put(x_test), labels(y_test),
                   num_classes=10, in_channels=raw.x_train.shape[1])


def _load_on_all_ranks(config: RunConfig, rank: int, world_size: int) -> datasets.ImageData:
    if world_size == 1:
        return datasets.load(config.dataset, config.data_dir, download=config.download)
    import torch.distributed as dist

    error, data = None, None
    if rank == 0:
        try:
            data = datasets.load(config.dataset, config.data_dir, download=config.download)
        except Exception as err:  # the other ranks must hear of any failure, or they wait forever
            error = err
    flag = torch.tensor([0 if error is None else 1],
                        device=f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(flag, src=0)
    if error is not None:
        raise error
    if flag.item():
        raise datasets.MissingDataError(f"{config.dataset}: rank 0 could not load it from "
                                        f"{datasets.folder(config.dataset, config.data_dir)}")
    return data if rank == 0 else datasets.load(config.dataset, config.data_dir, download=False)


# --------------------------------------------------------------------------------------- models

def _factory(spec: str):
    module_name, _, name = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        # As `python -m` does: a module in the current folder is found without PYTHONPATH.
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model {spec!r}: cannot import {module_name!r} ({err})") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"model {spec!r}: {module_name} has no callable {name!r}")
    return factory


def _factory_name(spec: str) -> str:
    """The factory's name in ``package.module:factory``."""
    return spec.partition(":")[2]


def build_model(config: RunConfig, data: RunData) -> nn.Module:
    """The config's model for ``data``, trained by ``config.method`` (FA layers throughout).

    ``mlp``: in-128-64-classes (relu, relu, identity), the tutorial's; ``lenet``, ``resnet20``,
    ``resnet56``: ``fa_triton.models``; ``package.module:factory``: called with those of
    ``method, init, backend, num_classes, in_channels`` it accepts, and converted
    (``fa_triton.convert``) if it returns a model with no FA layer.
    """
    options = {"method": config.method, "init": config.init, "backend": config.backend}
    if config.model == "mlp":
        sizes = (data.x_train.shape[1], *MLP_HIDDEN, data.num_classes)
        return models.mlp(sizes, MLP_ACTIVATIONS, **options)
    if config.model == "lenet":
        return models.lenet(**options, num_classes=data.num_classes, in_channels=data.in_channels)
    if config.model in ("resnet20", "resnet56"):
        build = getattr(models, config.model)
        return build(**options, num_classes=data.num_classes, in_channels=data.in_channels)
    factory = _factory(config.model)
    offered = {**options, "num_classes": data.num_classes, "in_channels": data.in_channels}
    parameters = inspect.signature(factory).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    given = {k: v for k, v in offered.items() if takes_all or k in parameters}
    try:
        model = factory(**given)
    except Exception as err:  # the user's code: say which call failed, and with what
        call = ", ".join(f"{k}={v!r}" for k, v in given.items())
        hint = (" (method='dfa': return a model of FA layers, or plain nn.Linear/nn.Conv2d layers that "
                "fa_triton.convert turns into DFA)" if config.method == "dfa" and "method" in given else "")
        raise ValueError(f"model {config.model!r}: the factory raised {type(err).__name__}: {err}, called as "
                         f"{_factory_name(config.model)}({call}){hint}") from err
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {config.model!r} returned a {type(model).__name__}, not an nn.Module")
    if not fa_layers(model) and not isinstance(model, DFANetwork):
        from ..convert import convert

        model = convert(model, **options)
    return model


def make_optimizer(config: RunConfig, model: nn.Module, capturable: bool = False) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        extra = {"capturable": True} if capturable else {}
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, **extra)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def has_weight_angle(model: nn.Module, method: str) -> bool:
    """Whether the rule has a W-B angle: every rule but backprop and DFA (whose B has another shape)."""
    return method not in ("backprop", "dfa")


# ---------------------------------------------------------------------------------------- seeds

class SeedRun:
    """One seed's training: model, optimizer, schedule, generators and the rows so far."""

    def __init__(self, config: RunConfig, data: RunData, seed: int, device: torch.device, *, rank: int = 0,
                 world_size: int = 1, model: nn.Module | None = None, graphed: bool = False) -> None:
        self.config, self.data, self.seed, self.device = config, data, seed, device
        self.rank, self.world_size = rank, world_size
        torch.manual_seed(seed)
        self.model = (build_model(config, data) if model is None else model).to(device)
        self.layers = fa_layers(self.model)
        if not self.layers:
            raise ValueError(f"model has no FALinear or FAConv2d layer: {type(self.model).__name__}")
        self.train_model = wrap_ddp(self.model, self.layers, device) if world_size > 1 else self.model
        self.optimizer = make_optimizer(config, self.model, capturable=graphed)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(config.milestones), config.gamma)
        self.shuffle = torch.Generator().manual_seed(seed)
        self.crops = torch.Generator().manual_seed(seed + 2**32)  # augmentation: its own stream
        self.step = GraphedTrainStep(self.model, self.optimizer, data.x_train, data.y_train,
                                     config.batch_size) if graphed else None
        self.eval_graphs = {} if graphed else None  # evaluation's captured forwards (GraphedForward)
        self.rows: list[dict] = []
        self.epoch = 0
        if config.uses_augmentation:
            channels = data.x_train.shape[1]
            self.black = datasets.normalize(torch.zeros(1, channels, 1, 1), config.dataset).flatten()

    # What a checkpoint holds, and a resume restores.
    def state(self) -> dict:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "shuffle": self.shuffle.get_state(),
                 "crops": self.crops.get_state(), "rng": torch.get_rng_state(), "rows": self.rows,
                 "epoch": self.epoch}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.shuffle.set_state(state["shuffle"])
        self.crops.set_state(state["crops"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.rows, self.epoch = list(state["rows"]), state["epoch"]

    def _batches(self) -> torch.Tensor:
        """This epoch's global batches [steps, batch_size] (a fresh shuffle every epoch)."""
        return batch_indices(len(self.data.x_train), self.config.batch_size, self.shuffle)

    def _inputs(self, idx: torch.Tensor) -> torch.Tensor:
        """The augmented images of a global batch: drawn for the whole batch on every rank,
        then sharded, so that several processes train as one."""
        # The padding is black before normalization, as BioTorch pads the raw image.
        return datasets.augment(self.data.x_train[idx], self.crops, fill=self.black)

    def begin_epoch(self) -> tuple[torch.Tensor, float]:
        """(this epoch's batches [steps, batch_size] on the device, its learning rate); the
        model in training mode."""
        batches = self._batches().to(self.device)
        self.model.train()
        return batches, self.optimizer.param_groups[0]["lr"]

    def batch(self, idx: torch.Tensor, own: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """The (augmented) inputs and the labels of a global batch's share ``own``."""
        config, data = self.config, self.data
        x = self._inputs(idx)[own] if config.uses_augmentation else data.x_train[idx[own]]
        return x, data.y_train[idx[own]]

    def after_step(self) -> None:
        if self.config.method == "wm":  # weight mirroring: one mirror step after each update
            for layer in self.layers:
                layer.mirror()

    def train_epoch(self, progress=None) -> dict:
        """One epoch of optimizer steps, then the epoch's row; raises :class:`NonFiniteLoss`."""
        config, device = self.config, self.device
        epoch = self.epoch + 1
        batches, lr = self.begin_epoch()
        steps, share = len(batches), config.batch_size // self.world_size
        own = slice(self.rank * share, (self.rank + 1) * share)
        losses = torch.zeros(steps, device=device)
        synchronize(device)
        start = time.perf_counter()
        for i, idx in enumerate(batches):
            if self.step is not None:
                loss = self.step(idx)
            else:
                loss = optimizer_step(self.train_model, self.optimizer, *self.batch(idx, own))
                self.after_step()
            losses[i] = loss.detach()
            if device.type == "cpu" or (i + 1) % CHECK_EVERY == 0 or i + 1 == steps:
                self._check_finite(losses, i, epoch, steps)
            if progress is not None:
                progress.update(1)
                if i % CHECK_EVERY == 0:
                    progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        synchronize(device)
        return self.end_epoch(epoch, lr, time.perf_counter() - start)

    def end_epoch(self, epoch: int, lr: float, seconds: float) -> dict:
        """After an epoch's steps: the schedule's step and the epoch's row (kept in ``rows``)."""
        if self.world_size > 1:
            # Batch norm's running statistics: each rank updated them from its own half batch
            # in the last step; every rank evaluates with rank 0's.
            import torch.distributed as dist

            with torch.no_grad():
                for buffer in self.model.buffers():
                    dist.broadcast(buffer, src=0)
        self.scheduler.step()
        self.epoch = epoch
        row = self._row(epoch, lr, seconds)
        self.rows.append(row)
        return row

    def _check_finite(self, losses: torch.Tensor, i: int, epoch: int, steps: int) -> None:
        bad = ~torch.isfinite(losses[:i + 1])
        count = bad.sum()
        if self.world_size > 1:  # every rank stops together
            import torch.distributed as dist

            dist.all_reduce(count)
        if count.item():
            first = int(bad.nonzero()[0]) if bad.any() else i
            value = losses[first].item() if bad.any() else float("nan")
            where = f"seed {self.seed}, " if len(self.config.seeds) > 1 else ""
            raise NonFiniteLoss(f"the training loss is {value} at epoch {epoch}, step {first + 1} of {steps} "
                                f"({where}{self.config.method}, lr {self.config.lr:g}); stopped")

    def _row(self, epoch: int, lr: float, seconds: float) -> dict:
        config, data = self.config, self.data
        self.model.eval()
        chunk = 10_000 if data.x_train.dim() == 2 else 1_000
        row = {"method": config.method, "model": config.model, "dataset": config.dataset, "seed": self.seed,
               "epoch": epoch, "lr": lr}
        splits = [("train", data.x_train, data.y_train), ("val", data.x_val, data.y_val),
                  ("test", data.x_test, data.y_test)]
        results = {name: evaluate(self.model, x, y, chunk=chunk, graphs=self.eval_graphs)
                   for name, x, y in splits if x is not None}
        row.update({f"loss_{name}": loss for name, (loss, _) in results.items()})  # the tutorial's order
        row.update({f"acc_{name}": acc for name, (_, acc) in results.items()})
        row["seconds"] = seconds
        if has_weight_angle(self.model, config.method):
            for i, layer in enumerate(self.layers, start=1):
                row[f"angle_{i}"] = weight_alignment(layer).angle
        if config.method != "backprop":
            # On a fixed batch (the first training images, not augmented), in eval mode: batch
            # norm's statistics are not touched.
            n = min(len(data.x_train), config.batch_size)
            angles = gradient_alignment(self.model, data.x_train[:n], data.y_train[:n], F.cross_entropy)
            for i, angle in enumerate(angles, start=1):
                row[f"grad_angle_{i}"] = angle
        return row


# ------------------------------------------------------------------------------ seeds together

def together_reason(config: RunConfig, model: nn.Module | None = None, world_size: int = 1) -> str | None:
    """Why ``config``'s seeds cannot train in one pass (``RunConfig.together``), or None."""
    why = {"brsf": "each layer's Philox seed is a Python int, which torch.func cannot stack",
           "dfa": "DFANetwork's autograd Function has no torch.func form",
           "wm": "its mirror steps draw noise from the global random stream, which one pass would interleave "
                 "across the seeds"}
    if config.method in why:
        return f"method {config.method!r} cannot: {why[config.method]}"
    if world_size > 1 or config.nproc > 1:
        return f"it trains the seeds in one process, got nproc={max(world_size, config.nproc)}"
    if model is not None:
        random = [type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        # Buffers are stacked afresh each step: any a forward updates (batch norm's statistics...)
        # would be lost. The FA layers' feedback is read only.
        stateful = [name for name, _ in model.named_buffers() if name.rsplit(".", 1)[-1] != "feedback"]
        if random or stateful:
            what = f"random modules ({', '.join(sorted(set(random)))})" if random else \
                f"buffers a forward may update ({', '.join(stateful[:3])}{', ...' if len(stateful) > 3 else ''})"
            return (f"model {config.model!r} has {what}, which one vmapped pass cannot keep per seed: "
                    "batch norm, dropout and the like")
    return None


def runs_stacked_kernels(model: nn.Module) -> bool:
    """Whether a ``vmap`` over stacked copies of ``model`` runs the kernels' stacked launches: some
    FALinear whose backend resolves to the kernels for its weight (backend "triton", or "auto" on
    CUDA), which the vmap rule of ``fa_triton.ops.library`` takes."""
    from ..layers.linear import FALinear

    return any(resolve(m.backend, m.weight).name != "torch" for m in model.modules() if isinstance(m, FALinear))


class Together:
    """Several seeds' runs trained in one pass per step: their models' parameters and buffers
    stacked, then each seed's own optimizer step; each seed keeps its own data order,
    augmentation, optimizer, schedule, rows and checkpoint. The pass is PyTorch's ensembling
    recipe, a ``vmap`` of the loss over ``functional_call``, in one of two forms:

    - when the layers run the kernels (:func:`runs_stacked_kernels`): the vmapped losses, then one
      backward of their sum through plain autograd (each seed's gradient is its own: the sum's
      derivative is 1), so that every layer's forward and backward jobs are one stacked launch
      for all seeds (a grad transform would take the layers' aten-op form instead);
    - on the reference: ``vmap(grad(...))`` of the loss (the layers' aten-op form, batched
      matmuls), which on the CPU costs less than autograd outside the vmap (bench/ensemble.py)."""

    def __init__(self, runs: list[SeedRun]) -> None:
        import copy

        from torch.func import functional_call, grad_and_value, vmap

        self.runs = runs
        self.params = [dict(run.model.named_parameters()) for run in runs]
        self.buffers = [dict(run.model.named_buffers()) for run in runs]
        base = self.base = copy.deepcopy(runs[0].model).to("meta")

        def loss(params, buffers, x, y):
            return F.cross_entropy(functional_call(base, (params, buffers), (x,)), y)

        self.losses = vmap(loss)
        self.grads = None if runs_stacked_kernels(runs[0].model) else vmap(grad_and_value(loss))

    def step(self, params: dict, buffers: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """(each parameter's gradient [seeds, ...], each seed's loss [seeds]) at the stacked ``params``."""
        if self.grads is not None:
            return self.grads(params, buffers, x, y)
        params = {name: p.requires_grad_() for name, p in params.items()}  # fresh stacks: leaves of their own
        loss = self.losses(params, buffers, x, y)
        loss.sum().backward()
        # A parameter the loss does not reach gets zeros, as torch.func.grad gives it.
        return {name: torch.zeros_like(p) if p.grad is None else p.grad for name, p in params.items()}, loss.detach()

    def train_epoch(self, progress=None) -> list[dict]:
        """One epoch of every seed; their rows. Raises :class:`NonFiniteLoss` naming the seed."""
        runs, device = self.runs, self.runs[0].device
        epoch = runs[0].epoch + 1
        begun = [run.begin_epoch() for run in runs]
        self.base.train()  # the stacked forward's modules in training mode, as each seed's
        steps = len(begun[0][0])
        losses = torch.zeros(len(runs), steps, device=device)
        synchronize(device)
        start = time.perf_counter()
        # Buffers stay as they are during an epoch (those a forward updates are refused; the
        # optimizers step parameters only): stacked once.
        buffers = {name: torch.stack([b[name] for b in self.buffers]) for name in self.buffers[0]}
        for i in range(steps):
            pairs = [run.batch(batches[i]) for run, (batches, _) in zip(runs, begun)]
            x, y = torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])
            params = {name: torch.stack([p[name].detach() for p in self.params]) for name in self.params[0]}
            grads, loss = self.step(params, buffers, x, y)
            for k, run in enumerate(runs):
                run.optimizer.zero_grad(set_to_none=True)
                for name, p in self.params[k].items():
                    if p.requires_grad:
                        p.grad = grads[name][k]
                run.optimizer.step()
                run.after_step()
            losses[:, i] = loss.detach()
            if device.type == "cpu" or (i + 1) % CHECK_EVERY == 0 or i + 1 == steps:
                for k, run in enumerate(runs):
                    run._check_finite(losses[k], i, epoch, steps)
            if progress is not None:
                progress.update(1)
        synchronize(device)
        seconds = time.perf_counter() - start
        return [run.end_epoch(epoch, lr, seconds) for run, (_, lr) in zip(runs, begun)]


# ------------------------------------------------------------------------------------------ run

def checkpoint_path(out: Path, seed: int) -> Path:
    return out / "checkpoints" / f"seed{seed}.pt"


def _check_writable(out: Path) -> None:
    """Fail now, not after the first epoch, if ``out`` cannot be made and written."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={str(out)!r} is a file, not a folder")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write the results into {out}: {existing} is not writable")


def _unfinished(out: Path, config: RunConfig) -> list[str]:
    """The checkpoints in ``out`` of seeds that stopped before their planned epochs."""
    found = []
    for path in sorted((out / "checkpoints").glob("seed*.pt")):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            planned = state["run"]["epochs"]
        except Exception:  # unreadable: not a run of ours to protect
            continue
        if state["epoch"] < planned:
            found.append(f"{path.name} at epoch {state['epoch']} of {planned}")
    return found


def _write(out: Path, config: RunConfig, rows: list[dict], *, final: bool) -> None:
    import pandas as pd

    from .report import plot_training, summarize

    df = pd.DataFrame(rows)
    (out / "config.toml").write_text(config.to_toml())
    df.to_csv(out / "metrics.csv", index=False)
    if final:
        summarize(df).to_csv(out / "summary.csv", index=False)
        plot_training(df, out / "training.png")


def warn_few_steps(config: RunConfig, n_train: int) -> str | None:
    """The warning for a run too short for its rule to leave chance accuracy (None if it is long enough)."""
    per_epoch = n_train // config.batch_size
    total = per_epoch * config.epochs
    needed = MIN_STEPS.get(config.method, MIN_STEPS_FA)
    if total >= needed:
        return None
    why = ("" if config.method == "backprop" else
           ": feedback alignment first turns W towards B, then learns (the tutorial's MLP is at 0.33 test accuracy "
           "after 100 steps, where backprop is at 0.73)")
    return (f"only {total} optimizer steps in all ({n_train} training images // batch {config.batch_size} = "
            f"{per_epoch} per epoch, {config.epochs} epoch{'s' if config.epochs != 1 else ''}); "
            f"{config.method} needs about {needed} or more{why}; "
            "raise --epochs or --train-samples")


def run(config: RunConfig, *, model: nn.Module | None = None, write: bool = True,
        resume: bool = False, overwrite: bool = False, echo=print) -> "pandas.DataFrame":
    """Train ``config`` for each of its seeds and return every seed's rows (one per epoch).

    ``model``: train this module (one seed) instead of building ``config.model``. ``write``:
    write the outputs into ``config.out`` (rank 0). ``resume``: continue each seed from its
    checkpoint in ``out``; without it, an unfinished run in ``out`` is an error unless
    ``overwrite``. ``echo``: where the per-epoch lines and warnings go (rank 0).
    """
    import pandas as pd
    import torch.distributed as dist
    from tqdm.auto import tqdm

    rank, world_size, local_rank = distributed_env()
    if world_size > 1 and config.batch_size % world_size:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by the number of processes ({world_size})")
    if model is not None and len(config.seeds) > 1:
        raise ValueError(f"a given model trains one seed, got seeds={list(config.seeds)}")
    device = resolve_device(config.device)
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    graphed = _graphed(config, device, world_size)
    # Fails now, with the reason, if the backend cannot run on this device.
    resolve(config.backend, torch.empty(0, device=device))
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    out = Path(config.out)
    talk = rank == 0
    if write:
        _check_writable(out)
        if resume and not any((out / "checkpoints").glob("seed*.pt")):
            raise FileNotFoundError(f"resume: {out} holds no checkpoints/seed*.pt to resume from")
        if not resume and not overwrite:
            unfinished = _unfinished(out, config)
            if unfinished:
                raise ValueError(f"{out} holds an unfinished run ({', '.join(unfinished)}): pass --resume to "
                                 "continue it or --overwrite to start again")

    own_group = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        own_group = True
    if config.model not in MODELS:
        _factory(config.model)  # an import error now, before the data are read
    try:
        data = load_data(config, device, rank, world_size)
        warning = warn_few_steps(config, len(data.x_train))
        if warning and talk:
            warnings.warn(warning, stacklevel=2)
        rows, fresh = [], write and not resume
        if config.together and len(config.seeds) > 1:
            reason = together_reason(config, world_size=world_size)
            if reason is not None:
                raise ValueError(f"together: the seeds cannot train in one pass: {reason}")
            rows = _train_together(config, data, device, out, write=write, resume=resume, overwrite=overwrite,
                                   echo=echo)
            if write:
                _write(out, config, rows, final=True)
            return pd.DataFrame(rows)
        for seed in config.seeds:
            seed_run = SeedRun(config, data, seed, device, rank=rank, world_size=world_size, model=model,
                               graphed=graphed)
            path = checkpoint_path(out, seed)
            if resume and write:
                state = load_run(path, _identity(config, seed), compare=_resume_mismatch)
                if state is not None:
                    seed_run.restore(state)
                    if talk and seed_run.epoch < config.epochs:
                        echo(f"seed {seed}: resuming after epoch {seed_run.epoch}")
            for _ in range(seed_run.epoch, config.epochs):
                bar = tqdm(total=len(data.x_train) // config.batch_size, unit="batch", leave=False,
                           desc=(f"seed {seed} " if len(config.seeds) > 1 else "")
                           + f"epoch {seed_run.epoch + 1}/{config.epochs}",
                           disable=not config.progress or not talk)
                try:
                    row = seed_run.train_epoch(bar)
                except NonFiniteLoss as err:
                    if talk and write and (rows or seed_run.rows):
                        _write(out, config, rows + seed_run.rows, final=True)
                    kept = (f"the last good checkpoint is {path} (epoch {seed_run.epoch})"
                            if write and seed_run.epoch else
                            f"no checkpoint of seed {seed} was written" if len(config.seeds) > 1
                            else "no checkpoint was written")
                    raise NonFiniteLoss(f"{err}; {kept}") from None
                finally:
                    bar.close()
                if talk and write:
                    _save_epoch(out, config, [seed_run], rows + seed_run.rows, fresh=fresh, overwrite=overwrite)
                    fresh = False
                if talk and (config.progress or write):  # without a bar the epoch lines still go to the log
                    (tqdm.write if config.progress else echo)(_epoch_line(row, len(config.seeds) > 1))
            if world_size > 1:
                check_ranks_agree(seed_run.model)
            rows += seed_run.rows
        if talk and write:
            _write(out, config, rows, final=True)
    finally:
        if own_group:
            dist.destroy_process_group()
    return pd.DataFrame(rows)


def _save_epoch(out: Path, config: RunConfig, runs: list[SeedRun], rows: list[dict], *, fresh: bool,
                overwrite: bool) -> None:
    """After an epoch: each run's checkpoint and the outputs so far (``rows``). ``fresh``: the
    first epoch of a new run, which replaces what an old one left in ``out``."""
    if fresh:
        replaced = _clear(out)
        if replaced and not overwrite:
            warnings.warn(f"replaced an earlier run's results in {out}: {', '.join(replaced)}", stacklevel=3)
    for run_ in runs:
        save_run(checkpoint_path(out, run_.seed), _identity(config, run_.seed), **run_.state())
    _write(out, config, rows, final=False)


def _train_together(config: RunConfig, data: RunData, device: torch.device, out: Path, *, write: bool,
                    resume: bool, overwrite: bool, echo) -> list[dict]:
    """:func:`run`'s loop with the seeds trained in one pass (:class:`Together`): epoch by
    epoch, every seed's checkpoint and the outputs written after each; the rows seed by seed."""
    from tqdm.auto import tqdm

    runs = [SeedRun(config, data, seed, device) for seed in config.seeds]
    reason = together_reason(config, runs[0].model)
    if reason is not None:
        raise ValueError(f"together: the seeds cannot train in one pass: {reason}")
    if resume and write:
        for run_ in runs:
            state = load_run(checkpoint_path(out, run_.seed), _identity(config, run_.seed), compare=_resume_mismatch)
            if state is not None:
                run_.restore(state)
        if len({run_.epoch for run_ in runs}) > 1:
            raise ValueError(f"together: the checkpoints in {out} stop at different epochs "
                             f"({', '.join(f'seed {r.seed}: {r.epoch}' for r in runs)}); resume with --no-together")
        if runs[0].epoch < config.epochs:
            echo(f"seeds {', '.join(map(str, config.seeds))}: resuming after epoch {runs[0].epoch}")
    together, fresh = Together(runs), write and not resume

    def all_rows():
        return [row for run_ in runs for row in run_.rows]

    for _ in range(runs[0].epoch, config.epochs):
        bar = tqdm(total=len(data.x_train) // config.batch_size, unit="batch", leave=False,
                   desc=f"seeds together epoch {runs[0].epoch + 1}/{config.epochs}", disable=not config.progress)
        try:
            epoch_rows = together.train_epoch(bar)
        except NonFiniteLoss as err:
            if write and all_rows():
                _write(out, config, all_rows(), final=True)
            raise NonFiniteLoss(f"{err}; the last good checkpoints are in {out / 'checkpoints'} (epoch "
                                f"{runs[0].epoch})" if write and runs[0].epoch else f"{err}; no checkpoint was written"
                                ) from None
        finally:
            bar.close()
        if write:
            _save_epoch(out, config, runs, all_rows(), fresh=fresh, overwrite=overwrite)
            fresh = False
        if config.progress or write:
            for row in epoch_rows:
                (tqdm.write if config.progress else echo)(_epoch_line(row, True))
    return all_rows()


def _identity(config: RunConfig, seed: int) -> dict:
    """What a checkpoint must match to be resumed: the experiment, the seed; epochs may grow."""
    return {**config.experiment(), "seed": seed, "epochs": config.epochs}


def _resume_mismatch(recorded: dict, current: dict) -> str | None:
    changed = [f"{k} {recorded.get(k)!r} -> {current[k]!r}" for k in current
               if k != "epochs" and recorded.get(k) != current[k]]
    if changed:
        return "its experiment differs: " + "; ".join(changed)
    if recorded.get("epochs", 0) > current["epochs"]:
        raise ValueError(f"resume: the run in this folder was planned for {recorded['epochs']} epochs, and "
                         f"epochs={current['epochs']} would end it early: resume with --epochs "
                         f"{recorded['epochs']} or more")
    return None


def _clear(out: Path) -> list[str]:
    """Remove what an earlier run wrote into ``out`` (its outputs and its seeds' checkpoints,
    nothing else: other files stay); returns their names."""
    out.mkdir(parents=True, exist_ok=True)
    removed = []
    for path in [out / name for name in OUTPUTS] + sorted((out / "checkpoints").glob("seed*.pt")):
        if path.is_file():
            path.unlink()
            removed.append(str(path.relative_to(out)))
    (out / "checkpoints").mkdir(exist_ok=True)
    return removed


def _epoch_line(row: dict, with_seed: bool) -> str:
    seed = f"seed {row['seed']} " if with_seed else ""
    val = f" acc_val {row['acc_val']:.3f}" if "acc_val" in row else ""
    return (f"{seed}epoch {row['epoch']}: loss_test {row['loss_test']:.3f} acc_test {row['acc_test']:.3f}{val} "
            f"({row['seconds']:.1f} s)")


def _graphed(config: RunConfig, device: torch.device, world_size: int) -> bool:
    """Capture the step in a CUDA graph: by default for the tutorial's kind of run on CUDA."""
    reasons = []
    if config.optimizer != "adam":
        reasons.append("the optimizer is not adam")
    if config.milestones:
        reasons.append("the learning rate changes (milestones)")
    if config.uses_augmentation:
        reasons.append("the batches are augmented")
    if config.method == "wm":
        reasons.append("wm mirrors between steps")
    if input_form(config.model) != "flat":
        reasons.append(f"model {config.model!r} is not the mlp")
    if config.cuda_graph and reasons:
        raise ValueError(f"cuda_graph=True cannot capture this run's step: {'; '.join(reasons)}")
    choice = use_cuda_graph(config.cuda_graph, device, world_size)
    return choice and not reasons


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


__all__ = ["NonFiniteLoss", "RunData", "SeedRun", "build_model", "input_form", "load_data", "make_optimizer",
           "run", "warn_few_steps"]
