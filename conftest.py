"""The CPU/CUDA setup shared by tests/ and bench/: without a GPU, the Triton kernels run on CPU
tensors through Triton's interpreter, and tests marked ``cuda`` are skipped with the reason.

TRITON_INTERPRET must be set before any @triton.jit module is imported, hence here, in the
repository's root conftest, which pytest loads before any test module.
"""

import contextlib
import os

import pytest
import torch

from tests.helpers import HAS_CUDA, KERNEL_DEVICE

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _check_interpreter_numpy() -> None:
    # Triton's interpreter before 3.7 turns 1-element numpy arrays into ints, which numpy >= 2.4
    # refuses: every kernel test would fail with an InterpreterError that does not say why.
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy
    import triton

    def version(text):
        return tuple(int(part) for part in text.split("+")[0].split(".")[:2])

    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        raise pytest.UsageError(
            f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1, no GPU here) fails with numpy "
            f"{numpy.__version__}: install numpy<2.4 or triton>=3.7"
        )


_check_interpreter_numpy()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (compiled kernels, tf32, bf16 arithmetic or large shapes)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture
def kernel_device() -> str:
    return KERNEL_DEVICE


@pytest.fixture
def launches(monkeypatch):
    """(kernel name, grid) of every Triton kernel launch in the test, in order (each still runs)."""
    from fa_triton.kernels import launchers

    seen = []
    for name, kernel in launchers.JIT_KERNELS.items():
        def spy(*args, grid, _run=kernel.run, _name=name, **kwargs):
            seen.append((_name, tuple(grid)))
            return _run(*args, grid=grid, **kwargs)

        monkeypatch.setattr(kernel, "run", spy)
    return seen


@pytest.fixture
def fp32_matmul_precision():
    """A setter for PyTorch's fp32 matmul switch (True: tf32 allowed, False: IEEE); the switch is
    restored after the test.

    Not monkeypatch: on torch >= 2.13 with pytest >= 9.2 its undo deletes the attribute, which
    cuBLASModule refuses. Where the newer ``fp32_precision`` switch exists it is the one set and
    restored (torch >= 2.9 raises on reading ``allow_tf32`` once the newer switch is set).
    """
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    saved = getattr(matmul, name)

    def set_precision(allow_tf32: bool, *, switch: str = name) -> None:
        if switch == "fp32_precision":
            matmul.fp32_precision = "tf32" if allow_tf32 else "ieee"
        else:
            matmul.allow_tf32 = allow_tf32

    try:
        yield set_precision
    finally:
        with contextlib.suppress(RuntimeError):  # older torch may refuse one of the two names
            setattr(matmul, name, saved)
