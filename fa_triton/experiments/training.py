"""The training loop's pieces, shared by every experiment: devices and processes, shuffled
batches, one optimizer step (eager or captured in a CUDA graph), evaluation, DDP.

The data are held as tensors on the training device and batched by indexing, so the loop does
no per-sample Python work.
"""

from __future__ import annotations

import inspect
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn


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


def mean_over_batches(values: torch.Tensor, batch_size: int) -> float:
    """Mean of the per-batch means of ``values`` [n] in batches of ``batch_size`` (the last one may be short)."""
    n_full = values.numel() // batch_size
    means = values[: n_full * batch_size].view(n_full, batch_size).mean(1)
    if values.numel() % batch_size:
        means = torch.cat([means, values[n_full * batch_size:].mean().reshape(1)])
    return means.mean().item()


def on_side_stream(device: torch.device, fn):
    """``fn()`` on a new CUDA stream ordered after the current one (and the current one after it):
    where PyTorch's CUDA-graph documentation has the warm-up before a capture run."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        result = fn()
    torch.cuda.current_stream(device).wait_stream(side)
    return result


class GraphedForward:
    """``model(rows)`` without gradients for a fixed input shape, captured in one
    ``torch.cuda.CUDAGraph``: each call copies the rows into a static input and replays. The
    returned logits are the graph's static output, overwritten by the next call. Captured
    after two eager forwards on a side stream (they also tune the Triton kernels, which cannot
    be tuned while a graph is captured). In-place updates of the parameters (an optimizer's
    step) are seen by every replay; the module's mode is the one at capture. :meth:`fits`
    says whether the model still holds the memory the graph reads (a ``load_state_dict`` with
    ``assign=True``, a move or a cast gives it new tensors: the graph must be captured again)."""

    def __init__(self, model: nn.Module, example: torch.Tensor, warmup: int = 2) -> None:
        if not example.is_cuda:
            raise ValueError(f"a CUDA-graphed forward needs CUDA tensors, got {example.device}")
        # The tensors themselves are kept too: their memory stays theirs while the graph lives.
        self.state = [(t, t.data_ptr()) for t in (*model.parameters(), *model.buffers())]
        self.static_x = example.clone()
        with torch.no_grad():
            for _ in range(warmup):
                on_side_stream(example.device, lambda: model(self.static_x))
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.static_out = model(self.static_x)

    def fits(self, model: nn.Module) -> bool:
        """Whether ``model``'s parameters and buffers are the captured ones, in the same memory."""
        now = [*model.parameters(), *model.buffers()]
        return len(now) == len(self.state) and all(
            t is held and t.data_ptr() == pointer for t, (held, pointer) in zip(now, self.state))

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        self.static_x.copy_(rows)
        self.graph.replay()
        return self.static_out


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None,
             chunk: int = 10_000, graphs: dict | None = None) -> tuple[float, float]:
    """(loss, accuracy) of ``model`` on x [n, ...], y [n]: the mean cross-entropy and the fraction
    classified right, over the images (``batch_size=None``), or the means over batches of
    ``batch_size`` (a short last batch counts as one).

    The forward passes run ``chunk`` rows at a time (the numbers come out the same). ``graphs``:
    a dict the caller keeps for one model across calls; on CUDA each full chunk then replays a
    :class:`GraphedForward` captured at its first call (one per input shape, dtype, device and
    the module's train/eval mode, outside autocast; captured again when the model's tensors
    were replaced; if a capture fails, a warning says so and that shape runs eagerly).
    """
    losses, correct = [], []
    for start in range(0, len(x), chunk):
        rows = x[start:start + chunk]
        forward = None
        if (graphs is not None and rows.is_cuda and len(rows) == chunk
                and not torch.is_autocast_enabled(rows.device.type)):
            forward = _graphed_forward(graphs, model, rows)
        logits = forward(rows) if forward is not None else model(rows)
        target = y[start:start + chunk]
        losses.append(F.cross_entropy(logits.float(), target, reduction="none"))
        correct.append((logits.argmax(1) == target).float())
    losses, correct = torch.cat(losses), torch.cat(correct)
    if batch_size is None:
        return losses.double().mean().item(), correct.double().mean().item()
    return mean_over_batches(losses, batch_size), mean_over_batches(correct, batch_size)


_MISSING = object()


def _graphed_forward(graphs: dict, model: nn.Module, rows: torch.Tensor) -> GraphedForward | None:
    """The captured forward for ``rows``' kind from ``graphs`` (captured now if it is new, or if
    the model's tensors changed), or None where capturing failed (that kind then runs eagerly)."""
    key = (tuple(rows.shape), rows.dtype, rows.device, model.training)
    forward = graphs.get(key, _MISSING)
    if forward is None or (forward is not _MISSING and forward.fits(model)):
        return forward
    try:
        forward = GraphedForward(model, rows)
    except Exception as err:  # noqa: BLE001 - any capture failure falls back to eager evaluation
        warnings.warn(f"evaluation could not be captured in a CUDA graph ({type(err).__name__}: {err}); "
                      f"rows of shape {tuple(rows.shape)} are evaluated eagerly", stacklevel=3)
        forward = None
    graphs[key] = forward
    return forward


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


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                   y: torch.Tensor) -> torch.Tensor:
    """One optimizer step on the batch x [B, ...], y [B] (cross-entropy); returns the loss (0-d)."""
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               idx: torch.Tensor) -> torch.Tensor:
    """:func:`optimizer_step` on the batch x[idx], y[idx]."""
    return optimizer_step(model, optimizer, x[idx], y[idx])


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
                return on_side_stream(self.x.device,
                                      lambda: train_step(self.model, self.optimizer, self.x, self.y, idx))
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


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank): from the process group if one is up, else torchrun's variables."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0"))


def check_ranks_agree(model: nn.Module) -> None:
    """Raise if any rank's parameters or buffers differ from rank 0's (DDP should keep them bitwise equal)."""
    import torch.distributed as dist

    flat = torch.cat([t.detach().reshape(-1).float() for t in (*model.parameters(), *model.buffers())])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    for other_rank, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            raise RuntimeError(f"after training, rank {other_rank}'s weights differ from rank 0's")


def use_cuda_graph(cuda_graph: bool | None, device: torch.device, world_size: int) -> bool:
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


def wrap_ddp(model: nn.Module, layers: list, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel, with rank 0's feedback state on every rank."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    with torch.no_grad():
        # The feedback state (B, R, brsf's seed and counter, DFA's B) is in the buffers; kp's B
        # is a Parameter, which DDP broadcasts itself.
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
        for layer in layers:
            if layer.method == "brsf":
                layer.sync_seed()
    # DDP broadcasts rank 0's parameters once here. Feedback never changes, so buffers need no
    # re-broadcast every forward (the option's name changed in recent PyTorch).
    # Batch norm's running statistics are the exception: rank 0's are sent at every forward,
    # as DDP does by default, so that every rank evaluates the same model.
    sync = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    options = {"device_ids": [device.index] if device.type == "cuda" else None}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        options["forward_sync_buffers"] = sync
    else:
        options["broadcast_buffers"] = sync
    return DistributedDataParallel(model, **options)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
