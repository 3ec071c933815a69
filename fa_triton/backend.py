"""The backends of the FA layer and how one is chosen.

(The module is ``backend``, not ``backends``: Dynamo skips, and will not trace, any file whose
path contains ``triton/backends``, which ``fa_triton/backends.py`` would.)

- ``"triton"``: the fused kernels of ``fa_triton.kernels`` (CUDA tensors in float32, float16 or
  bfloat16; CPU tensors through Triton's interpreter under ``TRITON_INTERPRET=1``).
- ``"reference"``: plain PyTorch ops (``fa_triton.reference``), any device and floating dtype.
  Its public name, in ``backend=`` arguments, is ``"torch"``.

- ``"auto"``: on CUDA tensors of a Triton dtype, each step of the layer (forward, δ pass,
  backward input, backward weight) runs on whichever of the two was faster for its shapes,
  dtype, layout and rule on this GPU: both are timed at the first call of a key and the choice
  is kept (``fa_triton.kernels.autotune``: in memory and on disk, per GPU and versions), so
  ``auto`` is never slower than the reference. Off CUDA, the reference. With
  ``FA_TRITON_AUTOTUNE=0``, Triton without timing.

Each backend is a :class:`Backend` of four steps with one signature for all (see
``fa_triton/reference.py``); the autograd Functions and the ``torch.library`` ops call them.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from . import reference

#: The values ``backend=`` takes (public names).
BACKENDS = ("auto", "triton", "torch")
#: Dtypes the Triton kernels compute in.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_kernels_module = None


def kernels():
    """``fa_triton.kernels``, imported on first use: triton may be missing (CPU-only installs),
    and ``TRITON_INTERPRET=1`` only takes effect if set before this import."""
    global _kernels_module
    if _kernels_module is None:
        try:
            from . import kernels as module
        except ImportError as err:  # pragma: no cover - depends on the installation
            raise RuntimeError(f"backend='triton' needs the triton package, which failed to import: {err}") from err
        _kernels_module = module
    return _kernels_module


def check_backend(backend: str) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


# (backend, device type, dtype) -> resolved name; only successful resolutions are kept.
_RESOLVED: dict[tuple, str] = {}


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The backend that runs for ``x``: "triton", "reference" or "auto" (see the module docstring).

    Raises ``ValueError``/``TypeError``/``RuntimeError`` naming the reason when ``backend``
    cannot run on x's device or dtype. Resolved once per (backend, device type, dtype).
    """
    key = (backend, x.device.type, x.dtype)
    resolved = _RESOLVED.get(key)
    if resolved is None:
        resolved = _RESOLVED[key] = _resolve(backend, x.device, x.dtype)
    return resolved


def _resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    check_backend(backend)
    if backend == "torch":
        return "reference"
    if backend == "auto":
        if device.type != "cuda" or dtype not in TRITON_DTYPES:
            return "reference"
        return "auto" if kernels().autotune.AUTOTUNE else "triton"
    if dtype not in TRITON_DTYPES:
        raise TypeError(
            f"backend='triton' supports dtypes {TRITON_DTYPES}, got x of dtype {dtype}; use backend='torch'"
        )
    if device.type == "cpu":
        if not kernels().INTERPRETED:
            raise RuntimeError(
                "backend='triton' got CPU tensors, which need Triton's interpreter: set the environment "
                "variable TRITON_INTERPRET=1 before Triton is first imported (before importing fa_triton), "
                "move the tensors to CUDA, or use backend='torch'"
            )
        if dtype == torch.bfloat16:
            # The interpreter loads bf16 as garbage rather than failing: refuse instead.
            raise TypeError(
                "backend='triton' on CPU tensors runs Triton's interpreter, which has no bfloat16 arithmetic; "
                "got x of dtype torch.bfloat16 (under torch.autocast('cpu') too): use backend='torch' or 'auto'"
            )
    elif device.type != "cuda":
        raise ValueError(f"backend='triton' runs on CUDA tensors (or CPU with TRITON_INTERPRET=1), got {device}")
    return "triton"


class Backend(NamedTuple):
    """One backend's four steps of the FA layer, with one signature for both backends
    (``fa_triton/reference.py`` documents them): ``forward``; ``local_error`` (δ = g ⊙ f'(z),
    grad_b = Σ_rows δ); ``backward_input`` (grad_x = δ B, B as the rule forms it) and
    ``backward_weight`` (grad_W = δᵀ x), both reading the δ that local_error formed once."""

    name: str
    forward: Callable
    local_error: Callable
    backward_input: Callable
    backward_weight: Callable


def _triton_forward(x, weight, bias, activation, negative_slope, store_extra):
    return kernels().fa_linear_forward(x, weight, bias, activation, negative_slope, store_extra)


def _triton_local_error(grad_y, saved, activation, negative_slope, need_delta, bias_grad):
    if activation == "identity" and not bias_grad:
        return (grad_y if need_delta else None), None  # δ = g: no pass at all
    store = need_delta and activation != "identity"
    delta, grad_b = kernels().fa_linear_local_error(grad_y, saved, activation, negative_slope, store_delta=store,
                                                    bias_grad=bias_grad)
    return (delta if store else grad_y if need_delta else None), grad_b


def _triton_backward_input(delta, feedback, weight, counter, rule):
    # The sign rules' B is formed into a buffer for this call only: no B is kept between steps.
    return kernels().fa_linear_backward_input(delta, None, feedback, "identity", feedback_mode=rule.kind,
                                              weight=weight, feedback_scale=rule.scale, seed=rule.seed,
                                              counter=counter)


def _triton_backward_weight(delta, x):
    return kernels().fa_linear_backward_weight(delta, None, x, "identity", bias_grad=False)[0]


TRITON = Backend("triton", _triton_forward, _triton_local_error, _triton_backward_input, _triton_backward_weight)
REFERENCE = Backend("reference", reference.forward, reference.local_error, reference.backward_input,
                    reference.backward_weight)
BY_NAME = {"triton": TRITON, "reference": REFERENCE}


# ------------------------------------------------------------------------------ backend="auto"

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


def _forward_key(x, weight, bias, activation, negative_slope, store_extra):
    return ("forward", _dtype(x), _bucket(x.shape[0]), weight.shape[0], x.shape[1], _layout(x), _layout(weight),
            bias is None, activation, store_extra)


def _local_error_key(grad_y, saved, activation, negative_slope, need_delta, bias_grad):
    return ("local_error", _dtype(grad_y), _bucket(grad_y.shape[0]), grad_y.shape[1], _layout(grad_y), _layout(saved),
            activation, need_delta, bias_grad)


def _backward_input_key(delta, feedback, weight, counter, rule):
    source = feedback if weight is None or rule.kind == "matrix" else weight
    return ("backward_input", _dtype(delta), _bucket(delta.shape[0]), delta.shape[1], source.shape[1], _layout(delta),
            _layout(feedback), _layout(weight), rule.kind)


def _backward_weight_key(delta, x):
    return ("backward_weight", _dtype(delta), _bucket(delta.shape[0]), delta.shape[1], x.shape[1], _layout(delta),
            _layout(x))


class AutoStep:
    """One step of ``backend="auto"``: per key, the backend (TRITON or REFERENCE) that ran the
    step faster on this GPU, chosen by ``fa_triton.kernels.autotune.TUNER`` (timed at the key's
    first call, then remembered in memory and on disk)."""

    def __init__(self, step: str, key_of: Callable):
        self.step, self.key_of = step, key_of
        self.chosen: dict[tuple, Backend] = {}

    def backend_for(self, *args) -> Backend:
        key = self.key_of(*args)
        backend = self.chosen.get(key)
        if backend is None:
            backend = self._choose(key, args)
        return backend

    def __call__(self, *args):
        return getattr(self.backend_for(*args), self.step)(*args)

    def _choose(self, key: tuple, args: tuple) -> Backend:
        device = args[0].device
        tuner = kernels().autotune.TUNER
        with kernels().plans.tuning_device(device):
            # During CUDA-graph capture nothing is timed: Triton stands in until a later call chooses.
            name, final = tuner.choose(kernels().tuning.device_name(device), ("auto",) + key, ("triton", "torch"),
                                       lambda name: getattr(_BY_PUBLIC[name], self.step)(*args), stand_in="triton")
        backend = _BY_PUBLIC[name]
        if final:
            self.chosen[key] = backend
        return backend


_BY_PUBLIC = {"triton": TRITON, "torch": REFERENCE}
AUTO = Backend("auto", AutoStep("forward", _forward_key), AutoStep("local_error", _local_error_key),
               AutoStep("backward_input", _backward_input_key), AutoStep("backward_weight", _backward_weight_key))
BY_NAME["auto"] = AUTO


def clear_auto_choices() -> None:
    """Forget this process's fast lookup of auto choices (the tuner keeps its own)."""
    for step in AUTO[1:]:
        step.chosen.clear()
