"""The op layer under the layers: the backends and their registry (``backends/``), the autograd
of the FA layer, FAConv2d, DFA and a chain of FA layers (``autograd.py``, ``conv.py``, ``dfa.py``,
``sequential.py``), the
``torch.library`` ops ``torch.compile`` traces (``library.py``), the functional form
(``functional.py``) and the argument checks of every entry point (``validation.py``)."""
