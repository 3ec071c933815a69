"""The networks of the published FA benchmarks, buildable with any rule of the family.

- :func:`mlp` — an MLP of :class:`~fa_triton.FALinear` layers (the founding tutorial's
  784-128-64-10, relu, relu, identity, by default).
- :func:`lenet` — BioTorch's LeNet for MNIST and Fashion-MNIST (32×32 inputs): conv(1→6, 5),
  ReLU, max-pool 2, conv(6→16, 5), ReLU, max-pool 2, conv(16→120, 5), ReLU, fc 120→84, ReLU,
  fc 84→10.
- :func:`resnet20`, :func:`resnet56` — the CIFAR ResNets of He et al. (2016): a 3×3 conv to 16
  channels, three stages of n basic blocks (16, 32, 64 channels; n = 3 and 9), global average
  pooling, fc 64→10; shortcuts are identities, subsampled and zero-padded where a stage halves
  the size (their option A).

Each is built from ``nn`` layers, initialised by ``init`` ("kaiming": PyTorch's defaults;
"xavier": weights xavier-uniform, biases 0, as BioTorch), then converted with
``fa_triton.convert(model, method=...)``: ``method`` is any of ``fa_triton.METHODS`` or "dfa".
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .convert import convert
from .layers.dfa_network import DFANetwork
from .layers.linear import FALinear
from .layers.sequential import FASequential
from .ops.validation import check_int
from .rules.methods import INITS, METHODS


def mlp(sizes=(784, 128, 64, 10), activations=("relu", "relu", "identity"), *, bias: bool = True,
        backend: str = "auto", method: str = "fa", init: str = "kaiming", device=None, dtype=None) -> nn.Module:
    """One :class:`~fa_triton.FALinear` per layer in an :class:`~fa_triton.FASequential` (the
    chain trained as one autograd Function), [..., sizes[0]] -> [..., sizes[-1]] logits;
    ``activations[i]`` follows layer i (``len(activations) == len(sizes) - 1``). ``method`` and
    ``init`` are every layer's; ``method="dfa"`` gives a :class:`~fa_triton.DFANetwork` of the
    same layers (drawn as by backprop, B after them)."""
    sizes, activations = list(sizes), list(activations)
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least an input and an output size, got {sizes}")
    if len(activations) != len(sizes) - 1:
        raise ValueError(
            f"activations must have one entry per layer (len(sizes) - 1 = {len(sizes) - 1}), "
            f"got {len(activations)}: {activations}"
        )
    if method == "dfa" and len(sizes) < 3:
        raise ValueError(f"method='dfa' needs at least two layers, got sizes {sizes}")
    layers = [FALinear(n_in, n_out, bias=bias, activation=act, backend=backend,
                       method="backprop" if method == "dfa" else method, init=init, device=device, dtype=dtype)
              for n_in, n_out, act in zip(sizes[:-1], sizes[1:], activations)]
    if method == "dfa":
        return DFANetwork(layers, backend=backend, init=init)
    return FASequential(*layers)


def _init(model: nn.Module, init: str) -> nn.Module:
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "xavier":
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    return model


def _check(method: str, init: str, num_classes: int, in_channels: int = 1) -> None:
    """The builders' arguments, checked before any layer is made."""
    if not isinstance(method, str) or method not in METHODS + ("dfa",):
        raise ValueError(f"method must be one of {METHODS + ('dfa',)}, got {method!r}")
    if not isinstance(init, str) or init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    check_int("num_classes", num_classes)
    check_int("in_channels", in_channels)


def _build(model: nn.Module, method: str, init: str, backend: str) -> nn.Module:
    return convert(_init(model, init), backend=backend, method=method, init=init)


def lenet(method: str = "fa", *, init: str = "kaiming", num_classes: int = 10, in_channels: int = 1,
          backend: str = "auto") -> nn.Module:
    """BioTorch's LeNet (MNIST, Fashion-MNIST): input [N, in_channels, 32, 32] -> logits [N, num_classes]."""
    _check(method, init, num_classes, in_channels)
    model = nn.Sequential(
        nn.Conv2d(in_channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 120, 5), nn.ReLU(), nn.Flatten(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )
    return _build(model, method, init, backend)


class _Pad(nn.Module):
    """Option A shortcut: subsample by 2 and zero-pad the channels (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x):
        half = self.extra // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = _Pad(out_channels - in_channels) if stride != 1 or in_channels != out_channels \
            else nn.Identity()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 CIFAR images."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers, channels = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for block in range(blocks_per_stage):
                layers.append(BasicBlock(channels, width, 2 if stage > 0 and block == 0 else 1))
                channels = width
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.stages(F.relu(self.bn(self.conv(x))))
        return self.fc(self.pool(x).flatten(1))


def resnet20(method: str = "fa", *, init: str = "kaiming", num_classes: int = 10, in_channels: int = 3,
             backend: str = "auto") -> nn.Module:
    """CIFAR ResNet-20 (3 blocks per stage): input [N, in_channels, 32, 32] -> logits [N, num_classes]."""
    _check(method, init, num_classes, in_channels)
    return _build(CifarResNet(3, num_classes, in_channels), method, init, backend)


def resnet56(method: str = "fa", *, init: str = "kaiming", num_classes: int = 10, in_channels: int = 3,
             backend: str = "auto") -> nn.Module:
    """CIFAR ResNet-56 (9 blocks per stage): input [N, in_channels, 32, 32] -> logits [N, num_classes]."""
    _check(method, init, num_classes, in_channels)
    return _build(CifarResNet(9, num_classes, in_channels), method, init, backend)
