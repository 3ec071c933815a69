"""What the tests share besides the float64 oracle (``tests/oracle.py``)."""

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
