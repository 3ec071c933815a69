"""What the tests share besides the float64 oracle (``tests/oracle.py``)."""

import torch

HAS_CUDA = torch.cuda.is_available()
# The device the Triton kernels are tested on: real kernels on a GPU, the interpreter otherwise.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"
