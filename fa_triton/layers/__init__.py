"""The layers: :class:`FALinear` (``linear.py``), :class:`FAConv2d` (``conv.py``), what both hold
besides their weights (``state.py``), and direct feedback alignment over an MLP
(:class:`DFANetwork`, ``dfa_network.py``) or any network of FA layers (:class:`DFAModel`,
``dfa_model.py``); chains of FA layers trained as one autograd Function (:class:`FASequential`,
``sequential.py``)."""

from .conv import FAConv2d
from .dfa_model import DFAModel
from .dfa_network import DFANetwork
from .linear import FALinear
from .sequential import FASequential

__all__ = ["DFAModel", "DFANetwork", "FAConv2d", "FALinear", "FASequential"]
