"""fa_triton: feedback-alignment layers on fused Triton kernels.

Public API: :class:`FALinear`, :class:`FAConv2d`, :func:`fa_linear`, :func:`reference`,
:func:`convert`, :func:`load_linear_state_dict`, :class:`DFANetwork`, :class:`DFAModel`,
``METHODS``, ``ACTIVATIONS``, ``BACKENDS``; the modules ``models``, ``metrics``, ``mnist`` and
``kernels`` load on first use (``fa_triton.models.lenet(...)`` works after ``import fa_triton``).
Importing the package touches no GPU and does not import Triton. The ``torch.library`` ops
``torch.ops.fa_triton.*`` are registered on import.

The package, by role: ``rules`` (the FA family and the activations), ``ops`` (autograd, the
``torch.library`` ops, the backends and the checks), ``layers`` (FALinear, FAConv2d, DFA),
``experiments`` (the MNIST job and the command line); ``convert``, ``metrics`` and ``models``
on top; ``kernels`` (the Triton kernels) beneath.
"""

import importlib as _importlib

from .convert import ConversionSummary, convert, load_linear_state_dict
from .layers.conv import FAConv2d
from .layers.dfa_model import DFAModel
from .layers.dfa_network import DFANetwork
from .layers.linear import FALinear
from .layers.sequential import FASequential
from .ops import library  # noqa: F401 - registers the torch.library ops (fa_triton::*)
from .ops.autograd import FALinearFunction, ReferenceFALinearFunction
from .ops.backends import BACKENDS
from .ops.functional import fa_linear, reference
from .rules.activations import ACTIVATIONS
from .rules.methods import INITS, METHODS

__version__ = "0.1.0"

# Loaded on first use: models and metrics are light but not needed to train a layer; mnist
# brings torchvision, kernels brings Triton.
_LAZY = {"models": ".models", "metrics": ".metrics", "mnist": ".experiments.mnist", "kernels": ".kernels"}


def __getattr__(name: str):
    if name in _LAZY:
        module = _importlib.import_module(_LAZY[name], __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'fa_triton' has no attribute {name!r}")


__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "ConversionSummary",
    "DFAModel",
    "DFANetwork",
    "FAConv2d",
    "FALinear",
    "FALinearFunction",
    "FASequential",
    "INITS",
    "METHODS",
    "ReferenceFALinearFunction",
    "convert",
    "fa_linear",
    "load_linear_state_dict",
    "reference",
]
