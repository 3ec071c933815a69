"""Test setup: without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before any @triton.jit module is imported, hence here,
before the tests import fa_triton's kernels.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The device the Triton kernels are tested on: real kernels on a GPU, the interpreter otherwise.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


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
