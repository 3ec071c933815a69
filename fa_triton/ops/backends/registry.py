"""The registry of the FA layer's backends: the one table from a ``backend=`` name to code.

A backend is a :class:`Backend`: the same eight steps of the layer in every implementation
(signatures in ``reference.py``) — ``forward``; ``local_error`` (δ = g ⊙ f'(z) and grad_b in one
pass); ``backward_input`` (grad_x = δ B, B as the rule forms it) and ``backward_weight``
(grad_W = δᵀ x), both reading the δ that local_error formed once; ``dfa_delta`` (DFA's
δ = (e B) ⊙ f' for every hidden layer at once; also a chain's δ_{l-1} = (δ_l B_l) ⊙ f'_{l-1},
``fa_triton.ops.sequential``); ``feedback_matrix`` (B as the rule forms it, for dfa_delta);
``chain_forward`` and ``chain_backward`` (a chain's whole forward, and its backward's δ chain,
in one fused launch each, or None where the backend has none for it — or, for "auto", where
the caller's ``stepwise`` run was faster: the chain then runs ``forward`` layer by layer and
``dfa_delta`` step by step) —
and what the op layer registers on it: its eager ``torch.autograd.Function``
(``fa_triton.ops.autograd``), its ``torch.library`` ops and the layer through them
(``fa_triton.ops.library``). Every caller — the layers, DFA, convert, the ops — finds a
backend through :func:`resolve` (or :func:`get`).
"""

from __future__ import annotations

from typing import Callable

import torch

#: The values ``backend=`` takes.
BACKENDS = ("auto", "triton", "torch")
#: Dtypes the Triton kernels compute in.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_kernels_module = None


def kernels():
    """``fa_triton.kernels``, imported on first use: triton may be missing (CPU-only installs),
    and ``TRITON_INTERPRET=1`` only takes effect if set before Triton is imported."""
    global _kernels_module
    if _kernels_module is None:
        try:
            from ... import kernels as module
        except ImportError as err:  # pragma: no cover - depends on the installation
            raise RuntimeError(f"backend='triton' needs the triton package, which failed to import: {err}") from err
        _kernels_module = module
    return _kernels_module


class Backend:
    """One backend: its name and its eight steps (the module docstring); ``function``, ``ops``
    and ``layer_op`` are filled in by the op layer when it defines them."""

    __slots__ = ("name", "forward", "local_error", "backward_input", "backward_weight", "dfa_delta",
                 "feedback_matrix", "chain_forward", "chain_backward", "function", "ops", "layer_op")

    def __init__(self, name: str, forward: Callable, local_error: Callable, backward_input: Callable,
                 backward_weight: Callable, dfa_delta: Callable, feedback_matrix: Callable, chain_forward: Callable,
                 chain_backward: Callable):
        self.name, self.forward, self.local_error = name, forward, local_error
        self.backward_input, self.backward_weight, self.dfa_delta = backward_input, backward_weight, dfa_delta
        self.feedback_matrix, self.chain_forward, self.chain_backward = feedback_matrix, chain_forward, chain_backward
        self.function = None  # the eager autograd Function (fa_triton.ops.autograd)
        self.ops = None  # the torch.library ops (fa_triton.ops.library)
        self.layer_op = None  # the layer through those ops, which torch.compile traces (same module)

    def replace(self, **steps) -> "Backend":
        """A backend of the same name with some steps replaced (the custom ops' backward uses one)."""
        fields = {name: getattr(self, name) for name in ("forward", "local_error", "backward_input",
                                                          "backward_weight", "dfa_delta", "feedback_matrix",
                                                          "chain_forward", "chain_backward")}
        fields.update(steps)
        return Backend(self.name, **fields)

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"


#: The registry: ``backend=`` name -> Backend (filled by the implementations' modules).
REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    REGISTRY[backend.name] = backend
    return backend


def get(name: str) -> Backend:
    """The registered backend of this name (one of :data:`BACKENDS`)."""
    check_backend(name)
    return REGISTRY[name]


def check_backend(backend: str, allowed: tuple = BACKENDS, what: str = "backend") -> None:
    """Raise ``ValueError`` unless ``backend`` is one of ``allowed`` (a layer without Triton
    kernels allows fewer, and says so in ``what``)."""
    if not isinstance(backend, str) or backend not in allowed:
        if isinstance(backend, str) and backend in BACKENDS:
            raise ValueError(f"{what} must be one of {allowed}, got {backend!r}")
        raise ValueError(f"backend must be one of {allowed}, got {backend!r}")


def resolve(backend: str, x: torch.Tensor) -> Backend:
    """The backend that runs for ``x`` (see ``fa_triton.ops.backends``): TRITON, TORCH or AUTO.

    Raises ``ValueError``/``TypeError``/``RuntimeError`` naming the reason when ``backend``
    cannot run on x's device or dtype. Resolved once per (backend, device type, dtype).
    """
    if torch.compiler.is_compiling():
        # Traced, the cache would be guarded on: its first fill would recompile the graph.
        return REGISTRY[_resolve(backend, x.device, x.dtype)]
    key = (backend, x.device.type, x.dtype)
    resolved = _RESOLVED.get(key)
    if resolved is None:
        resolved = _RESOLVED[key] = REGISTRY[_resolve(backend, x.device, x.dtype)]
    return resolved


# (backend, device type, dtype) -> the backend that runs; only successful resolutions are kept.
_RESOLVED: dict[tuple, Backend] = {}


def _resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    check_backend(backend)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if device.type != "cuda" or dtype not in TRITON_DTYPES:
            return "torch"
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
