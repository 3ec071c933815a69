"""Triton kernels of fa_triton (installed as ``fa_triton.kernels``).

Importing this package compiles nothing and touches no GPU; set ``TRITON_INTERPRET=1``
before it is first imported to run the kernels on CPU tensors through Triton's interpreter.
"""

from .fa_linear import (
    INTERPRETED,
    fa_linear_backward_input,
    fa_linear_backward_weight,
    fa_linear_forward,
)

__all__ = [
    "INTERPRETED",
    "fa_linear_forward",
    "fa_linear_backward_input",
    "fa_linear_backward_weight",
]
