"""What the benchmarks time: shape families, providers, modes, and the work (FLOPs, bytes) of each.

Shapes use nn.Linear's names: M rows of the batch, K = in_features, N = out_features.

Providers (all timed on the same inputs, in one process):

- ``fa_triton_auto``: ``backend="auto"``, the default: on CUDA each step of the layer (forward,
  δ pass, backward input, backward weight) runs on whichever of Triton and the reference was
  faster for its key on this GPU (timed at the key's first call, outside the timing; kept in
  ``$FA_TRITON_CACHE_DIR``). Off CUDA "auto" is the reference, and this provider times that.
- ``fa_triton``: the Triton kernels only (``backend="triton"``); ``fa_triton_interpreter`` when
  they run through Triton's CPU interpreter (a correctness smoke run, not a speed).
- ``reference``: the PyTorch FA implementation (``fa_triton.reference``), the baseline.
- ``backprop``: ``nn.Linear`` + activation under ordinary autograd: the same FLOPs, the speed a
  user compares with.
- ``compiled``: ``torch.compile`` of the reference (inductor; where it works).

Modes: ``forward``, ``backward`` (of a retained graph), ``forward_backward`` of one layer with
x, W and b requiring grad; ``train_step`` of the tutorial MLP: zero_grad, forward, cross-entropy,
backward, Adam step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import fa_triton
from fa_triton.rules.activations import apply_activation

PROVIDERS = ("reference", "fa_triton_auto", "fa_triton", "backprop", "compiled")
#: The providers that run fa_triton's layer (the backend= they pass).
FA_BACKENDS = {"fa_triton_auto": "auto", "fa_triton": "triton"}
LAYER_MODES = ("forward", "backward", "forward_backward")
MLP_MODES = ("train_step",)
MODES = LAYER_MODES + MLP_MODES
FAMILIES = ("tutorial", "square", "mlp")
# "tf32": float32 tensors with torch.backends.cuda.matmul.allow_tf32 on (for every provider).
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The founding tutorial: MLP 784-128-64-10, ReLU, ReLU, identity; (in, out, activation) per layer.
TUTORIAL_LAYERS = ((784, 128, "relu"), (128, 64, "relu"), (64, 10, "identity"))
TUTORIAL_BATCHES = (64, 8192)
SQUARE_SIZES = (1024, 2048, 4096, 8192)
MLP_KERNEL = "mlp_784-128-64-10"
ADAM_LR = 3e-4

# The interpreter runs a few programs per second: bigger problems are not attempted there.
INTERPRETER_MAX_MACS = 1 << 22


@dataclass(frozen=True)
class Case:
    """One problem: a layer (M, N, K, activation) or the MLP at batch M."""

    family: str
    M: int
    N: int
    K: int
    activation: str = "relu"

    @property
    def kernel(self) -> str:
        return MLP_KERNEL if self.family == "mlp" else f"fa_linear_{self.activation}"

    @property
    def modes(self) -> tuple[str, ...]:
        return MLP_MODES if self.family == "mlp" else LAYER_MODES

    @property
    def macs(self) -> int:
        if self.family == "mlp":
            return sum(self.M * n * k for k, n, _ in TUTORIAL_LAYERS)
        return self.M * self.N * self.K

    def label(self) -> str:
        return f"{self.kernel} M={self.M} N={self.N} K={self.K}"


def family_of(kernel: str, M: int, N: int, K: int) -> str:
    """The shape family of a CSV row (the plots draw one figure per family)."""
    if kernel.startswith("mlp"):
        return "mlp"
    if kernel.startswith("peak"):
        return "peak"
    return "square" if M == N == K else "tutorial"


def tutorial_cases(batches=TUTORIAL_BATCHES) -> list[Case]:
    return [Case("tutorial", m, n, k, act) for m in batches for k, n, act in TUTORIAL_LAYERS]


def square_cases(sizes=SQUARE_SIZES) -> list[Case]:
    return [Case("square", s, s, s, "relu") for s in sizes]


def mlp_cases(batches=TUTORIAL_BATCHES) -> list[Case]:
    k, n = TUTORIAL_LAYERS[0][0], TUTORIAL_LAYERS[-1][1]
    return [Case("mlp", m, n, k, "relu") for m in batches]


# ----------------------------------------------------------------------------- work model

def flops(case: Case, mode: str) -> float:
    """FLOPs of one call: forward 2·M·N·K, backward 4·M·N·K (grad_x and grad_W).

    The MLP step counts each layer's forward and grad_W, and grad_x for every layer but the
    first (its input needs no gradient); loss and Adam are not counted.
    """
    if case.family == "mlp":
        total = 0
        for i, (k, n, _) in enumerate(TUTORIAL_LAYERS):
            total += 2 * case.M * n * k * (2 if i == 0 else 3)
        return float(total)
    per_matmul = 2.0 * case.M * case.N * case.K
    return {"forward": 1, "backward": 2, "forward_backward": 3}[mode] * per_matmul


def min_bytes(case: Case, mode: str, element_size: int) -> float:
    """Bytes a perfect implementation must move: every operand read once, every result written once.

    forward: x, W, b in, y out; backward: g, the saved activation (none for identity), B, x in,
    grad_x, grad_W, grad_b out; the MLP step: every layer's forward and backward, plus Adam
    (parameter, gradient and two moments read, three written).
    """
    def layer(M, N, K, activation, mode, need_grad_x=True):
        fwd = M * K + N * K + N + M * N
        saved = M * N if activation != "identity" else 0
        bwd = M * N + saved + M * K + N * K + N + (N * K + M * K if need_grad_x else 0)
        return {"forward": fwd, "backward": bwd, "forward_backward": fwd + bwd}[mode]

    if case.family == "mlp":
        elements = 0
        for i, (k, n, act) in enumerate(TUTORIAL_LAYERS):
            elements += layer(case.M, n, k, act, "forward_backward", need_grad_x=i > 0)
            elements += 7 * (n * k + n)  # Adam
        return float(elements * element_size)
    return float(layer(case.M, case.N, case.K, case.activation, mode) * element_size)


# ----------------------------------------------------------------------------- callables

@dataclass
class Bench:
    """A ready-to-time call. ``fn()`` runs one iteration; ``reset()`` clears accumulated grads."""

    fn: Callable[[], object]
    grad_to_none: list[torch.Tensor] = field(default_factory=list)
    loop_timing: bool = False  # time back-to-back calls (host overhead included): the training loop

    def reset(self) -> None:
        for t in self.grad_to_none:
            t.grad = None


def provider_label(provider: str, device: torch.device) -> str:
    """The provider name recorded in results (the interpreter is labelled as such)."""
    if provider == "fa_triton" and device.type == "cpu":
        return "fa_triton_interpreter"
    return provider


def unsupported_reason(case: Case, provider: str, dtype_name: str, device: torch.device) -> str | None:
    """Why this combination is not run, or None."""
    if provider == "fa_triton" and device.type == "cpu":
        from fa_triton import kernels

        if not kernels.INTERPRETED:
            return "fa_triton on CPU needs TRITON_INTERPRET=1 set before the kernels are imported"
        if DTYPES[dtype_name] == torch.bfloat16:
            return "Triton's interpreter has no bf16 arithmetic"
        if case.macs > INTERPRETER_MAX_MACS:
            return f"too big for Triton's interpreter ({case.macs} > {INTERPRETER_MAX_MACS} multiply-adds)"
    if dtype_name == "tf32" and device.type != "cuda":
        return "tf32 exists only on CUDA"
    return None


def _compile(fn):
    # A fresh dynamo cache per case: no recompile limit is hit and each case gets its own graphs.
    torch._dynamo.reset()
    return torch.compile(fn)


def layer_function(provider: str, activation: str) -> Callable:
    """(x, weight, bias, feedback) -> y for one provider."""
    if provider in FA_BACKENDS:
        backend = FA_BACKENDS[provider]
        return lambda x, w, b, fb: fa_triton.fa_linear(x, w, b, fb, activation, backend=backend)
    if provider == "reference":
        return lambda x, w, b, fb: fa_triton.reference(x, w, b, fb, activation)
    if provider == "backprop":
        # nn.Linear's own op and the activation under ordinary autograd (feedback unused: backprop).
        return lambda x, w, b, fb: apply_activation(F.linear(x, w, b), activation, 0.01)
    if provider == "compiled":
        return _compile(lambda x, w, b, fb: fa_triton.reference(x, w, b, fb, activation))
    raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")


def input_copies(case: Case, device: torch.device, element_size: int) -> int:
    """How many input sets to rotate through: enough that they do not all fit in L2 (GPU only)."""
    if device.type != "cuda":
        return 1
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 0) or 50 * 2**20
    footprint = (case.M * case.K + 2 * case.M * case.N) * element_size
    if case.family == "mlp":
        footprint = sum(case.M * (k + 2 * n) for k, n, _ in TUTORIAL_LAYERS) * element_size
    return 1 if footprint >= l2 else min(8, math.ceil(2 * l2 / footprint))


def build_layer(case: Case, provider: str, mode: str, dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> Bench:
    # Drawn on the device itself: 8192x8192 inputs would take seconds on the host.
    gen = torch.Generator(device=device).manual_seed(seed)
    fn = layer_function(provider, case.activation)
    bound = 1 / math.sqrt(case.K)

    def uniform(*shape):
        return ((torch.rand(*shape, generator=gen, device=device) * 2 - 1) * bound).to(dtype)

    def normal(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    weight = uniform(case.N, case.K).requires_grad_(True)
    bias = uniform(case.N).requires_grad_(True)
    feedback = uniform(case.N, case.K)
    copies = input_copies(case, device, torch.empty((), dtype=dtype).element_size())
    xs = [normal(case.M, case.K).requires_grad_(True) for _ in range(copies)]
    grads = [normal(case.M, case.N) for _ in range(copies)]
    params = [weight, bias]
    step = iter(range(1 << 62))

    if mode == "forward":
        def run():
            i = next(step) % copies
            return fn(xs[i], weight, bias, feedback)
    elif mode == "backward":
        ys = [fn(x, weight, bias, feedback) for x in xs]

        def run():
            i = next(step) % copies
            ys[i].backward(grads[i], retain_graph=True)
    elif mode == "forward_backward":
        def run():
            i = next(step) % copies
            fn(xs[i], weight, bias, feedback).backward(grads[i])
    else:
        raise ValueError(f"mode must be one of {LAYER_MODES} for a layer case, got {mode!r}")
    return Bench(run, grad_to_none=xs + params)


def build_mlp(case: Case, provider: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Bench:
    """One Adam training step of the tutorial's MLP at batch case.M."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for in_features, out_features, activation in TUTORIAL_LAYERS:
        if provider == "backprop":
            layers.append(nn.Linear(in_features, out_features))
            if activation != "identity":
                layers.append(nn.ReLU())
        else:
            backend = FA_BACKENDS.get(provider, "torch")
            layers.append(fa_triton.FALinear(in_features, out_features, activation=activation, backend=backend))
    model = nn.Sequential(*layers).to(device=device, dtype=dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=ADAM_LR)
    forward = _compile(model) if provider == "compiled" else model
    gen = torch.Generator(device=device).manual_seed(seed)
    copies = input_copies(case, device, torch.empty((), dtype=dtype).element_size())
    xs = [torch.rand(case.M, case.K, generator=gen, device=device).to(dtype) for _ in range(copies)]
    targets = [torch.randint(0, case.N, (case.M,), generator=gen, device=device) for _ in range(copies)]
    step = iter(range(1 << 62))

    def run():
        i = next(step) % copies
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(xs[i]), targets[i])
        loss.backward()
        optimizer.step()
        return loss

    return Bench(run, loop_timing=True)


def build(case: Case, provider: str, mode: str, dtype_name: str, device: torch.device | str, seed: int = 0) -> Bench:
    """The callable timing `provider` on `case` in `mode` (see the module docstring)."""
    device = torch.device(device)
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if dtype_name not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype_name!r}")
    if mode not in case.modes:
        raise ValueError(f"mode must be one of {case.modes} for {case.label()}, got {mode!r}")
    dtype = DTYPES[dtype_name]
    if case.family == "mlp":
        return build_mlp(case, provider, dtype, device, seed)
    return build_layer(case, provider, mode, dtype, device, seed)
