"""The backends of the FA layer, and how one is chosen: one registry (``registry.py``) of three
implementations with the same five steps.

- ``"triton"`` (``triton.py``): the fused kernels of ``fa_triton.kernels`` (CUDA tensors in
  float32, float16 or bfloat16; CPU tensors through Triton's interpreter under
  ``TRITON_INTERPRET=1``).
- ``"torch"`` (``reference.py``): the reference, plain PyTorch ops, any device and floating dtype.
- ``"auto"`` (``auto.py``): on CUDA tensors of a Triton dtype, each step on whichever of the two
  is faster there (timed once per key and cached); off CUDA, the reference. With
  ``FA_TRITON_AUTOTUNE=0``, Triton without timing.

(The folder is ``ops/backends``: Dynamo skips, and will not trace, any file whose path contains
``triton/backends``, which this path does not.)
"""

from .auto import AUTO, AutoLayerSteps, clear_auto_choices
from .reference import TORCH
from .registry import BACKENDS, REGISTRY, TRITON_DTYPES, Backend, check_backend, get, kernels, resolve
from .triton import TRITON, TRITON_STACKED, LayerSteps

__all__ = ["AUTO", "AutoLayerSteps", "BACKENDS", "REGISTRY", "TORCH", "TRITON", "TRITON_DTYPES", "TRITON_STACKED",
           "Backend", "LayerSteps", "check_backend", "clear_auto_choices", "get", "kernels", "resolve"]
