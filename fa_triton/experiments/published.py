"""The published numbers ``fa-triton reproduce`` compares against, each with its source.

Values are as the sources print them: accuracies in [0, 1] for the tutorial, percentages for
the papers. Nothing here is measured by this package.
"""

from __future__ import annotations

from typing import NamedTuple


class Published(NamedTuple):
    metric: str
    """What the numbers are, e.g. "test error % of the best-validation epoch"."""
    values: dict
    """Per rule (``fa_triton`` method names)."""
    source: str
    """Who published them, where (a link), and the file or table they come from."""
    extra: dict = {}
    """Other published numbers (e.g. angles), per name, per rule."""


TUTORIAL = Published(
    metric="acc_test after epochs 1 and 10, loss_test after epoch 10",
    values={"fa": {"acc_test@1": 0.884, "acc_test@10": 0.959, "loss_test@10": 0.136}},
    source="the founding tutorial: Bender.jl's feedback-alignment example (MNIST MLP 784-128-64-10, Adam 3e-4, "
           "batch 64), https://rasmuskh.github.io/Bender.jl/dev/notebooks/FAexample/",
)

AKROUT_MNIST = Published(
    metric="test accuracy % at the last epoch (400)",
    values={"backprop": 98.50, "fa": 97.80, "wm": 98.49, "kp": 98.45},
    source="Akrout, Wilson, Humphreys, Lillicrap, Tweed (2019), Deep learning without weight transport, "
           "NeurIPS, https://arxiv.org/abs/1904.05391; numbers from their code's "
           "experiments/mnist/*/results.json, https://github.com/makrout/Deep-Learning-without-Weight-Transport",
    extra={"output-layer angle (degrees)": {"fa": 40.0, "wm": 3.8, "kp": 3.6}},
)

_BIOTORCH = ("Sanfiz and Akrout (2021), Benchmarking the accuracy and robustness of feedback alignment algorithms, "
             "https://arxiv.org/abs/2108.13446; BioTorch's Benchmarks.md, "
             "https://github.com/jsalbert/biotorch/blob/main/Benchmarks.md")

BIOTORCH_MNIST = Published(
    metric="top-1 test error % (the best epoch; their test set is also their validation set)",
    values={"backprop": 0.91, "fa": 1.70, "dfa": 1.61, "usf": 0.94, "brsf": 0.91, "frsf": 0.97},
    source=_BIOTORCH + ", MNIST LeNet table",
)

BIOTORCH_FASHION_MNIST = Published(
    metric="top-1 test error % (the best epoch; their test set is also their validation set)",
    values={"backprop": 9.20, "fa": 13.06, "dfa": 12.81, "usf": 9.69, "brsf": 10.02, "frsf": 9.61},
    source=_BIOTORCH + ", Fashion-MNIST LeNet table",
)

BIOTORCH_CIFAR10_RESNET20 = Published(
    metric="top-1 test error % of the best-validation model (45k/5k split)",
    values={"backprop": 8.63, "fa": 32.16, "dfa": 45.94, "usf": 10.05, "brsf": 11.02, "frsf": 11.20},
    source=_BIOTORCH + ", CIFAR-10 ResNet-20 SGD table; protocol from benchmark_configs/cifar10/resnet_20/sgd/",
)

BIOTORCH_MNIST_LR = {"backprop": 0.03, "fa": 0.003, "dfa": 0.001, "usf": 0.01, "brsf": 0.01, "frsf": 0.01}
"""Learning rates for BioTorch's MNIST protocol, which they did not publish: chosen by us, per
rule, as the lowest validation error (the last 5,000 training images held out, 2 epochs) among
0.1, 0.03, 0.01, 0.003, 0.001, 0.0001 (``bench/results/biotorch-mnist-lr.json`` holds the errors).
Fashion-MNIST ("same protocol as their MNIST") uses them too."""
