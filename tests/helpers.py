"""What the tests share besides the float64 oracle (``tests/oracle.py``)."""

import contextlib

import torch

HAS_CUDA = torch.cuda.is_available()
# The device the Triton kernels are tested on: real kernels on a GPU, the interpreter otherwise.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


def teacher_task(samples: int = 512, features: int = 20, classes: int = 4):
    """(x [samples, features], labels [samples]) from a random tanh teacher network: a small
    task every learning rule should make progress on in a few dozen steps."""
    from torch import nn

    teacher = nn.Sequential(nn.Linear(features, 30), nn.Tanh(), nn.Linear(30, classes))
    x = torch.randn(samples, features)
    return x, teacher(x).argmax(1).detach()


def train_on(model, x, target, steps: int, after_step=None, batch: int = 64, lr: float = 3e-3) -> list[float]:
    """Adam on cross-entropy, batches taken in order (wrapping around); the loss of each step.
    ``after_step(model)`` runs after every optimizer step (e.g. weight mirroring)."""
    import torch.nn.functional as F

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        idx = torch.arange(step * batch, (step + 1) * batch) % len(x)
        loss = F.cross_entropy(model(x[idx]), target[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(model)
        losses.append(loss.item())
    return losses


def write_fake_datasets(root, n_train: int = 256, n_test: int = 64):
    """Small generated files of every dataset the runner reads, in each one's own format, under
    ``root``; returns ``root`` (the real Fashion-MNIST and CIFAR-10 cannot be downloaded here)."""
    from fa_triton.experiments import datasets

    for name in datasets.DATASETS:
        datasets.write_fake(name, root, n_train=n_train, n_test=n_test)
    return root


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op threads set to ``count`` for the block (training runs bitwise alike)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
