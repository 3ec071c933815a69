"""Triton kernels of fa_triton (installed as ``fa_triton.kernels``).

- ``jit_helpers``: ``@triton.jit`` activation, derivative and tile-ordering helpers.
- ``fa_linear_kernels``: the kernels of the FA linear layer (forward, backward input, backward weight).
- ``tuning``: ``LaunchConfig``, tile tables, heuristic, autotuner; ``tuned_tables``: the sweep's table.
- ``fa_linear``: the launchers below (one cached launch plan per call key).

Importing this package compiles nothing and touches no GPU; set ``TRITON_INTERPRET=1``
before it is first imported to run the kernels on CPU tensors through Triton's interpreter.
"""

from .fa_linear import (
    INTERPRETED,
    LaunchConfig,
    fa_linear_backward_input,
    fa_linear_backward_weight,
    fa_linear_dfa_delta,
    fa_linear_forward,
)

__all__ = [
    "INTERPRETED",
    "LaunchConfig",
    "fa_linear_forward",
    "fa_linear_backward_input",
    "fa_linear_backward_weight",
    "fa_linear_dfa_delta",
]
