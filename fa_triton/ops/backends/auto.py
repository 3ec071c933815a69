"""``backend="auto"``: on CUDA tensors of a Triton dtype, each step of the layer (forward, δ
pass, backward input, backward weight, DFA's projection) runs on whichever of the Triton
kernels and the PyTorch reference was faster for its shapes, dtype, layout and rule on this
GPU, and a narrow chain's forward and backward on whichever of the fused MLP and the chain run
step by step was faster: both are timed at the first call of a key and the choice kept
(``fa_triton.kernels.autotune``: in memory and on disk, per GPU and versions), so ``auto`` is
never slower than the reference. Signatures as in ``reference.py``."""

from __future__ import annotations

from typing import Callable

import torch

from .reference import TORCH
from .registry import Backend, kernels, register
from .triton import TRITON, LayerSteps


def _layout(t: torch.Tensor | None) -> str:
    """A tensor's layout class, for the auto choice's key: what changes the GEMMs' cost."""
    if t is None:
        return "-"
    rows, cols = t.stride()
    if cols == 1 and rows >= t.shape[1]:
        return "rows"
    return "cols" if rows == 1 else "strided"


def _bucket(rows: int) -> int:
    return max(16, 1 << max(0, rows - 1).bit_length())  # the batch's next power of two, as the tuner's


def _dtype(t: torch.Tensor) -> str:
    precision = kernels().plans.dot_precision(t.dtype)
    return str(t.dtype).removeprefix("torch.") + ("/tf32" if t.dtype == torch.float32 and precision == "tf32" else "")


def _forward_key(x, weight, bias, activation, negative_slope, store_extra, out=None):
    return ("forward", _dtype(x), _bucket(x.shape[0]), weight.shape[0], x.shape[1], _layout(x), _layout(weight),
            bias is None, activation, store_extra)


def _local_error_key(grad_y, saved, activation, negative_slope, need_delta, bias_grad):
    return ("local_error", _dtype(grad_y), _bucket(grad_y.shape[0]), grad_y.shape[1], _layout(grad_y), _layout(saved),
            activation, need_delta, bias_grad)


def _backward_input_key(delta, feedback, weight, counter, rule):
    source = weight if rule.reads_weight else feedback
    return ("backward_input", _dtype(delta), _bucket(delta.shape[0]), delta.shape[1], source.shape[1], _layout(delta),
            _layout(feedback), _layout(weight), rule.method)


def _backward_weight_key(delta, x):
    return ("backward_weight", _dtype(delta), _bucket(delta.shape[0]), delta.shape[1], x.shape[1], _layout(delta),
            _layout(x))


def _dfa_delta_key(error, feedback, saved, activations, widths):
    return ("dfa_delta", _dtype(feedback), _bucket(error.shape[0]), error.shape[1], tuple(widths), _layout(error),
            tuple(activations))


class AutoStep:
    """One step of ``backend="auto"``: per key, the backend (TRITON or TORCH) that ran the
    step faster on this GPU, chosen by ``fa_triton.kernels.autotune.TUNER`` (timed at the key's
    first call, then remembered in memory and on disk)."""

    def __init__(self, step: str, key_of: Callable):
        self.step, self.key_of = step, key_of
        self.chosen: dict[tuple, Backend] = {}

    def backend_for(self, *args) -> Backend:
        key = (args[0].device.index,) + self.key_of(*args)  # per GPU: two models of GPU, two choices
        backend = self.chosen.get(key)
        if backend is None:
            backend = self._choose(key, args)
        return backend

    def __call__(self, *args):
        return getattr(self.backend_for(*args), self.step)(*args)

    def remembers(self, args: tuple, backend: Backend) -> bool:
        """Whether ``backend`` is this step's kept choice for ``args`` (not a stand-in of CUDA-graph capture)."""
        return self.chosen.get((args[0].device.index,) + self.key_of(*args)) is backend

    def _choose(self, key: tuple, args: tuple) -> Backend:
        device = args[0].device
        tuner = kernels().autotune.TUNER
        with kernels().plans.tuning_device(device):
            # During CUDA-graph capture nothing is timed: Triton stands in until a later call chooses.
            name, final = tuner.choose(kernels().tuning.device_name(device), ("auto",) + key[1:], ("triton", "torch"),
                                       lambda name: getattr(_BY_PUBLIC[name], self.step)(*args), stand_in="triton")
        backend = _BY_PUBLIC[name]
        if final:
            self.chosen[key] = backend
        return backend


_BY_PUBLIC = {"triton": TRITON, "torch": TORCH}
STEPS = (AutoStep("forward", _forward_key), AutoStep("local_error", _local_error_key),
         AutoStep("backward_input", _backward_input_key), AutoStep("backward_weight", _backward_weight_key),
         AutoStep("dfa_delta", _dfa_delta_key))


def _chain_forward_key(x, weights, biases, activations, out=None):
    return ("chain_forward", _dtype(x), _bucket(x.shape[0]), x.shape[1], tuple(w.shape[0] for w in weights),
            _layout(x), tuple(_layout(w) for w in weights), tuple(b is None for b in biases), tuple(activations))


def _chain_backward_key(grad_y, x, outputs, form_feedback, activations, need_grad_x, bias_grads, weight_grads,
                        methods=()):
    return ("chain_backward", _dtype(grad_y), _bucket(grad_y.shape[0]), x.shape[1],
            tuple(None if y is None else y.shape[1] for y in outputs), grad_y.shape[1], _layout(x),
            tuple(activations), need_grad_x, tuple(bias_grads), tuple(weight_grads), tuple(methods))


class ChainStep:
    """A chain step of ``backend="auto"`` (``chain_forward``, ``chain_backward``): per key,
    whichever of the kernels' fused narrow MLP and the caller's ``stepwise`` run (the chain layer
    by layer, or its backward step by step, each step as auto chose it) was faster on this GPU,
    timed at the key's first call by the same tuner as :class:`AutoStep`. Returns the fused
    result, or None for the caller to run stepwise. A chain the kernels cannot fuse is not timed;
    during CUDA-graph capture the stand-in is stepwise."""

    def __init__(self, step: str, key_of: Callable, fusable: Callable):
        self.step, self.key_of, self.fusable = step, key_of, fusable
        self.chosen: dict[tuple, str] = {}

    def __call__(self, *args, stepwise=None):
        if stepwise is None or not self.fusable(*args):
            return None
        key = (args[0].device.index,) + self.key_of(*args)
        choice = self.chosen.get(key)
        if choice is None:
            choice = self._choose(key, args, stepwise)
        return getattr(_BY_PUBLIC["triton"], self.step)(*args) if choice == "fused" else None

    def _choose(self, key: tuple, args: tuple, stepwise: Callable) -> str:
        device = args[0].device
        tuner = kernels().autotune.TUNER
        runs = {"fused": lambda: getattr(_BY_PUBLIC["triton"], self.step)(*args), "stepwise": stepwise}
        with kernels().plans.tuning_device(device):
            name, final = tuner.choose(kernels().tuning.device_name(device), ("auto",) + key[1:], ("fused", "stepwise"),
                                       lambda name: runs[name](), stand_in="stepwise")
        if final:
            self.chosen[key] = name
        return name


def _forward_fusable(x, weights, biases, *_):
    return kernels().mlp_fusable(x, weights, biases)


def _backward_fusable(grad_y, x, outputs, *_):
    return kernels().mlp_backward_fusable(grad_y, x, outputs)


CHAIN_STEPS = (ChainStep("chain_forward", _chain_forward_key, _forward_fusable),
               ChainStep("chain_backward", _chain_backward_key, _backward_fusable))


def chain_forward(x, weights, biases, activations, out=None, stepwise=None):
    return CHAIN_STEPS[0](x, weights, biases, activations, out, stepwise=stepwise)


def chain_backward(grad_y, x, outputs, form_feedback, activations, need_grad_x, bias_grads, weight_grads,
                   methods=(), stepwise=None):
    return CHAIN_STEPS[1](grad_y, x, outputs, form_feedback, activations, need_grad_x, bias_grads, weight_grads,
                          methods, stepwise=stepwise)


# Forming B is one memory pass (no GEMM to choose for): auto runs on CUDA, where the kernels form it.
AUTO = register(Backend("auto", *STEPS, TRITON.feedback_matrix, chain_forward, chain_backward))


# ------------------------------------------------------------------- one layer's eager calls

# CHOICES[0] changes whenever clear_auto_choices() runs: a choice a layer kept is valid only while it has not.
CHOICES = [0]


# What each step's key is built from, exactly (sizes, strides, dtypes, flags, the fp32 dot
# precision), and CHOICES: a call with the same layout has the same key and the same choice.
def _forward_layout(x, weight, bias, activation, negative_slope, store_extra, out=None):
    return (x.shape, x.stride(), x.dtype, weight.shape, weight.stride(), bias is None, activation, store_extra,
            kernels().plans.dot_precision(x.dtype), CHOICES[0])


def _local_error_layout(grad_y, saved, activation, negative_slope, need_delta, bias_grad):
    return (grad_y.shape, grad_y.stride(), grad_y.dtype, None if saved is None else (saved.shape, saved.stride()),
            activation, need_delta, bias_grad, kernels().plans.dot_precision(grad_y.dtype), CHOICES[0])


def _backward_input_layout(delta, feedback, weight, counter, rule):
    return (delta.shape, delta.stride(), delta.dtype, None if feedback is None else (feedback.shape, feedback.stride()),
            None if weight is None else (weight.shape, weight.stride()), rule.method,
            kernels().plans.dot_precision(delta.dtype), CHOICES[0])


def _backward_weight_layout(delta, x):
    return (delta.shape, delta.stride(), delta.dtype, x.shape, x.stride(), kernels().plans.dot_precision(delta.dtype),
            CHOICES[0])


class LayerAutoStep:
    """One :class:`AutoStep` for one layer's eager calls: the backend auto chose for the
    operands' layout of the step's last call, used again for a call of the same layout without
    building auto's key (its dtype name, batch bucket and layout classes); where auto chose the
    kernels, the layer's own ``LayerSteps`` step, which keeps its launch plan. A call of another
    layout asks the AutoStep (which may time both backends); a stand-in choice is not kept."""

    __slots__ = ("auto", "layout_of", "triton", "memo")

    def __init__(self, auto: AutoStep, layout_of: Callable, triton: LayerSteps):
        self.auto, self.layout_of, self.triton = auto, layout_of, triton
        self.memo = None  # (layout, the chosen steps, their step) of the last call

    def backend_for(self, *args):
        """The steps to run this step on (the layer's LayerSteps where auto chose the kernels)."""
        layout = self.layout_of(*args)
        memo = self.memo
        if memo is not None and memo[0] == layout:
            return memo[1]
        return self._ask_auto(layout, args)[1]

    def __call__(self, *args):
        layout = self.layout_of(*args)
        memo = self.memo
        if memo is None or memo[0] != layout:
            memo = self._ask_auto(layout, args)
        return memo[2](*args)

    def _ask_auto(self, layout: tuple, args: tuple) -> tuple:
        backend = self.auto.backend_for(*args)
        steps = self.triton if backend is TRITON else backend
        memo = (layout, steps, getattr(steps, self.auto.step))
        if self.auto.remembers(args, backend):
            self.memo = memo
        return memo


class AutoLayerSteps:
    """``backend="auto"``'s four layer steps for one layer's eager calls (``FALinear``'s fast
    path, which makes one per recorded fit): each a :class:`LayerAutoStep`, all four sharing one
    ``LayerSteps`` for what auto gives the kernels. The forward's is asked for its backend
    (``forward.backend_for``), as AUTO's is."""

    __slots__ = ("forward", "local_error", "backward_input", "backward_weight")
    name = "auto"

    def __init__(self):
        triton = LayerSteps()
        self.forward, self.local_error, self.backward_input, self.backward_weight = (
            LayerAutoStep(step, layout_of, triton) for step, layout_of in zip(STEPS, (
                _forward_layout, _local_error_layout, _backward_input_layout, _backward_weight_layout)))


def clear_auto_choices() -> None:
    """Forget this process's fast lookup of auto choices, the layers' kept ones included (the
    tuner keeps its own)."""
    for step in STEPS + CHAIN_STEPS:
        step.chosen.clear()
    CHOICES[0] += 1
