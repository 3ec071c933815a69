"""Triton kernels of fa_triton (installed as ``fa_triton.kernels``).

- ``jit_helpers``: ``@triton.jit`` activation, derivative, feedback-rule and tile-ordering helpers.
- ``linear_kernels``: the GEMM kernels (forward, backward input, backward weight, DFA).
- ``pass_kernels``: the memory passes (δ and grad_b, B of the sign rules, split sums).
- ``mlp_kernels``: the fused narrow MLP (a chain of up to 4 layers at most 128 wide): its forward in
  one launch, its backward's δ chain in another.
- ``tuning``: ``LaunchConfig``, tile tables, heuristic, autotuner; ``tuned_tables``: the sweep's table.
- ``plans``: the cached launch plans; ``launchers``: the launchers below (``fa_stacked_*``: E models'
  layer in one launch, the model as the grid's third axis).
- ``tutorial_gemm``: the Triton tutorial's GEMM, the yardstick of the loop guard and the benchmarks.

Importing this package compiles nothing and touches no GPU; set ``TRITON_INTERPRET=1``
before it is first imported to run the kernels on CPU tensors through Triton's interpreter.
"""

from .autotune import tuning_report
from .launchers import (
    INTERPRETED,
    LaunchConfig,
    clear_plans,
    fa_linear_backward_input,
    fa_linear_backward_weight,
    fa_linear_dfa_delta,
    fa_linear_feedback,
    fa_linear_forward,
    fa_linear_local_error,
    fa_mlp_backward,
    fa_mlp_forward,
    fa_mlp_weight_grads,
    fa_stacked_backward_input,
    fa_stacked_backward_weight,
    fa_stacked_feedback,
    fa_stacked_forward,
    fa_stacked_local_error,
    mlp_backward_fusable,
    mlp_fusable,
)

__all__ = [
    "INTERPRETED",
    "LaunchConfig",
    "clear_plans",
    "fa_linear_forward",
    "fa_linear_local_error",
    "fa_linear_feedback",
    "fa_linear_backward_input",
    "fa_linear_backward_weight",
    "fa_linear_dfa_delta",
    "fa_mlp_forward",
    "fa_mlp_backward",
    "fa_mlp_weight_grads",
    "fa_stacked_forward",
    "fa_stacked_local_error",
    "fa_stacked_feedback",
    "fa_stacked_backward_input",
    "fa_stacked_backward_weight",
    "mlp_fusable",
    "mlp_backward_fusable",
    "tuning_report",
]
