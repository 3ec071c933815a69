"""fa_triton: feedback-alignment linear layers on fused Triton kernels.

Public API: :class:`FALinear`, :func:`fa_linear`, :func:`reference`, :func:`convert`,
:func:`load_linear_state_dict`. Importing the package touches no GPU and does not import
Triton; the kernels load on first use. The ``torch.library`` ops ``torch.ops.fa_triton.*``
(:mod:`fa_triton.ops`) are registered on import.
"""

from . import ops  # noqa: F401 - registers the torch.library ops (fa_triton::*)
from .activations import ACTIVATIONS
from .autograd import FALinearFunction, ReferenceFALinearFunction
from .backend import BACKENDS
from .conv import FAConv2d
from .convert import ConversionSummary, convert, load_linear_state_dict
from .dfa import DFAModel, DFANetwork
from .functional import fa_linear, reference
from .methods import INITS, METHODS
from .modules import FALinear

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "ConversionSummary",
    "DFAModel",
    "DFANetwork",
    "FAConv2d",
    "FALinear",
    "FALinearFunction",
    "INITS",
    "METHODS",
    "ReferenceFALinearFunction",
    "convert",
    "fa_linear",
    "load_linear_state_dict",
    "reference",
]
