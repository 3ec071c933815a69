"""The layers: :class:`FALinear` (``linear.py``), :class:`FAConv2d` (``conv.py``), what both hold
besides their weights (``state.py``), and direct feedback alignment over an MLP
(:class:`DFANetwork`, ``dfa_network.py``) or any network of FA layers (:class:`DFAModel`,
``dfa_model.py``)."""

from .conv import FAConv2d
from .dfa_model import DFAModel
from .dfa_network import DFANetwork
from .linear import FALinear

__all__ = ["DFAModel", "DFANetwork", "FAConv2d", "FALinear"]
