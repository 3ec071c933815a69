"""Deprecated path: the MNIST job is ``fa_triton.experiments.mnist`` (``fa_triton.mnist`` still
works through ``import fa_triton``, loaded lazily)."""

import sys
import warnings

from .experiments import mnist as _mnist

warnings.warn("importing fa_triton.mnist as a module is deprecated: use fa_triton.experiments.mnist",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _mnist
