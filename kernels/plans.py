"""Launch plans: what the launchers (``launchers.py``) decide once per call key and reuse.

A plan holds, for one key (device, dtypes, sizes, strides, flags, dot precision, config), the
config, the grid, the int64 decision, the kernel variant and its constexpr arguments; calling
it costs one dictionary lookup and Triton's own launch. Keys are NamedTuples (typed, hashed
as tuples). Also here: the layout facts plans are built from (int64 offsets, TMA-addressable
rows, alignment) and the fp32 dot precision that follows PyTorch's switch.
"""

from __future__ import annotations

import contextlib

import torch

try:  # host-side tensor descriptors (Triton >= 3.4); without them only the pointer kernels run
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installation
    TensorDescriptor = None

from .tuning import LaunchConfig

_INT32_MAX = 2**31 - 1

# Plans by key; cleared when it grows past MAX_PLANS (a key per batch size and layout).
PLANS: dict[tuple, object] = {}
MAX_PLANS = 4096


def clear_plans() -> None:
    """Forget every cached launch plan (tuned configs are kept by ``autotune``)."""
    PLANS.clear()


def remember(key: tuple, plan) -> None:
    if len(PLANS) >= MAX_PLANS:
        PLANS.clear()
    PLANS[key] = plan


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for ints (``triton.cdiv`` is a constexpr function costing ~2 µs a call on the host)."""
    return -(-a // b)


class Launch:
    """One prepared kernel launch: the ``@triton.jit`` function, its grid and its constexpr and
    compile options."""

    __slots__ = ("kernel", "grid", "meta")

    def __init__(self, kernel, grid: tuple, meta: dict):
        self.kernel, self.grid, self.meta = kernel, grid, meta

    def __call__(self, *args) -> None:
        # JITFunction.run is what kernel[grid](*args) ends in; calling it directly skips a
        # wrapper per launch (bench/launch_overhead.py: the launcher's host cost stays <= 5 µs).
        self.kernel.run(*args, grid=self.grid, warmup=False, **self.meta)


class OnDevice:
    """Runs ``run(*args)`` with the tensors' CUDA device current: Triton launches on the
    *current* device, not on the tensors' own."""

    __slots__ = ("index", "run")

    def __init__(self, index: int, run):
        self.index, self.run = index, run

    def __call__(self, *args):
        if torch.cuda.current_device() == self.index:
            return self.run(*args)
        with torch.cuda.device(self.index):
            return self.run(*args)


def on_device(t: torch.Tensor, run):
    """``run``, made to launch on ``t``'s CUDA device (unchanged for CPU tensors)."""
    return OnDevice(t.device.index, run) if t.is_cuda else run


def tuning_device(device: torch.device):
    """A context making ``device`` current while the tuner times candidates on it."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ----------------------------------------------------------------------------- layout facts

_fp32_precision_getter = getattr(torch._C, "_get_fp32_precision_getter", None)


def fp32_matmul_allows_tf32() -> bool:
    """Whether PyTorch lets fp32 CUDA matmuls use tf32.

    Since torch 2.9 reading ``allow_tf32`` raises once the newer ``fp32_precision`` switch
    has been set, so that switch is read where it exists (setting ``allow_tf32`` updates it),
    through the C getter behind ``torch.backends.cuda.matmul.fp32_precision`` (a tenth of the
    attribute's cost: this runs at every fp32 launch).
    """
    if _fp32_precision_getter is not None:
        return _fp32_precision_getter("cuda", "matmul") == "tf32"
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def dot_precision(dtype: torch.dtype) -> str:
    """The dots' input precision: fp32 follows PyTorch's switch (IEEE unless the user allowed
    tf32); for half types the setting has no effect and "tf32" is Triton's default."""
    if dtype == torch.float32 and not fp32_matmul_allows_tf32():
        return "ieee"
    return "tf32"


def needs_int64(*tensors: torch.Tensor | None) -> bool:
    """Whether some element offset (Σ (size-1)·stride) of these tensors exceeds int32."""
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        if sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) > _INT32_MAX:
            return True
    return False


def tma_layout(*tensors: torch.Tensor | None) -> bool:
    """Whether tensor descriptors can address these 2-D tensors: unit last stride and 16-byte
    aligned row strides (the base pointers' alignment is checked at each call)."""
    if TensorDescriptor is None:
        return False
    for t in tensors:
        if t is None:
            continue
        stride_rows, stride_cols = t.stride()
        if stride_cols != 1 or (stride_rows * t.element_size()) % 16 or stride_rows < t.shape[1] or t.numel() == 0:
            return False
    return True


def aligned(*tensors: torch.Tensor | None) -> bool:
    """Whether every base pointer is 16-byte aligned (a descriptor's requirement)."""
    for t in tensors:
        if t is not None and t.data_ptr() % 16:
            return False
    return True


def descriptor(t: torch.Tensor, block_rows: int, block_cols: int):
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [block_rows, block_cols])


def check_tma(cfg: LaunchConfig, layout_ok: bool, what: str) -> None:
    if cfg.tma and not layout_ok:
        raise ValueError(
            f"config asks for the tensor-descriptor (TMA) {what} kernel, but the operands' layout does not allow it "
            "(each needs a unit last stride and 16-byte aligned rows); use tma=False"
        )


def check_out(out: torch.Tensor, shape: tuple, like: torch.Tensor, name: str) -> None:
    if tuple(out.shape) != shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"{name} must be a {like.dtype} tensor of shape {shape} on {like.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
