"""The two backends of the FA layer and how one is chosen.

(The module is ``backend``, not ``backends``: Dynamo skips, and will not trace, any file whose
path contains ``triton/backends``, which ``fa_triton/backends.py`` would.)

- ``"triton"``: the fused kernels of ``fa_triton.kernels`` (CUDA tensors in float32, float16 or
  bfloat16; CPU tensors through Triton's interpreter under ``TRITON_INTERPRET=1``).
- ``"reference"``: plain PyTorch ops (``fa_triton.reference``), any device and floating dtype.
  Its public name, in ``backend=`` arguments, is ``"torch"``.

``backend="auto"`` takes Triton for CUDA tensors of a Triton dtype, the reference otherwise.
Each backend is a :class:`Backend` of three functions with one signature for both (see
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
    """The backend that runs for ``x``: "triton" or "reference" (see the module docstring).

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
        return "triton" if device.type == "cuda" and dtype in TRITON_DTYPES else "reference"
    if dtype not in TRITON_DTYPES:
        raise TypeError(
            f"backend='triton' supports dtypes {TRITON_DTYPES}, got x of dtype {dtype}; use backend='torch'"
        )
    if device.type == "cpu":
        if not kernels().INTERPRETED:
            raise RuntimeError(
                "backend='triton' got CPU tensors, which need Triton's interpreter: set the environment "
                "variable TRITON_INTERPRET=1 before fa_triton's kernels are first used, move the tensors "
                "to CUDA, or use backend='torch'"
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
    """One backend's three launches (signatures of ``fa_triton/reference.py``) and its policies.

    ``backward_input(grad_y, saved, feedback, weight, counter, activation, negative_slope,
    store_delta, rule)`` forms B as ``rule`` (``fa_triton.methods.FeedbackRule``) says."""

    name: str
    forward: Callable
    backward_input: Callable
    backward_weight: Callable
    #: Whether the backward stores δ once when both grad_x and grad_W are wanted.
    stores_delta: Callable[[], bool]
    #: Whether a bias-only gradient sums δ in fp32 (as the kernels do) or in grad_y's dtype.
    bias_grad_in_fp32: bool


def _triton_forward(x, weight, bias, activation, negative_slope, store_extra):
    return kernels().fa_linear_forward(x, weight, bias, activation, negative_slope, store_extra)


def _triton_backward_input(grad_y, saved, feedback, weight, counter, activation, negative_slope, store_delta, rule):
    # The kernel forms B from the rule in its tiles: no B is materialized for usf or brsf.
    dtype = feedback.dtype if rule.kind == "matrix" else weight.dtype
    delta = torch.empty(grad_y.shape, device=grad_y.device, dtype=dtype) if store_delta else None
    grad_x = kernels().fa_linear_backward_input(
        grad_y, saved, feedback, activation, negative_slope, delta_out=delta, feedback_mode=rule.kind, weight=weight,
        feedback_scale=rule.scale, seed=rule.seed, counter=counter)
    return grad_x, delta


def _triton_backward_weight(grad_y, saved, x, activation, negative_slope, bias_grad):
    return kernels().fa_linear_backward_weight(grad_y, saved, x, activation, negative_slope, bias_grad)


def _triton_stores_delta() -> bool:
    return kernels().tuning.STORE_DELTA


TRITON = Backend("triton", _triton_forward, _triton_backward_input, _triton_backward_weight, _triton_stores_delta,
                 bias_grad_in_fp32=True)
# The reference forms δ once whenever both gradients need it.
REFERENCE = Backend("reference", reference.forward, reference.backward_input, reference.backward_weight,
                    lambda: True, bias_grad_in_fp32=False)
BY_NAME = {"triton": TRITON, "reference": REFERENCE}
