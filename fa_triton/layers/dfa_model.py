"""Direct feedback alignment (DFA; Nøkland 2016) for any network of FA layers:
:class:`DFAModel` (an MLP's DFA in one module is ``dfa_network.DFANetwork``).

The output error e = ∂L/∂output [M, n_out] is projected to the output of every hidden FA layer l
through a fixed random B_l [n_out, size of one sample's output], in one GEMM
(``fa_triton.ops.dfa.DFATapFunction``); each layer's own backward then applies its f' and forms
its weight gradient. The output layer gets its exact gradient.
"""

from __future__ import annotations

import collections
import functools

import torch
from torch import nn

from ..ops.backends import check_backend, resolve
from ..ops.dfa import DFATapFunction
from ..rules.methods import INITS, init_bound
from .conv import FAConv2d
from .linear import FALinear


class DFAModel(nn.Module):
    """Direct feedback alignment for any network of FALinear and FAConv2d layers (convolutional
    networks, residual ones included): the output error e is projected to the output of every
    hidden FA layer l by a fixed random B_l [n_out, size of one sample's output], in one GEMM
    (e [B_1 | B_2 | …], then each piece reshaped to the layer's output); each layer's own
    backward applies its f' and forms its weight gradient. Every hidden layer's output is cut
    from the graph for the layers above it (so no error flows down the network the backprop
    way) and tapped for the projection; the output layer gets its exact gradient.

    ``model``: the network (its FA layers in method "backprop", as ``convert(model,
    method="dfa")`` builds them); ``hidden``: its hidden FA layers (default: every FALinear and
    FAConv2d but the last registered). Each training forward checks that the output layer — the
    last FA layer called — is not among them and that each hidden layer ran exactly once.
    ``backend`` (as FALinear's): where the projection e·B runs.
    ``feedback`` [n_out, Σ sizes], its columns in the order the hidden layers run, is drawn at the
    first training forward, when the sizes are known, in the hidden layers' weight dtype
    ("kaiming": U(±1/√size_l); "xavier": U(±√(6/(n_out+size_l)))), and is in ``state_dict``
    from then on; an input that gives other sizes is an error, not a new B.
    With a normalization between a layer and its activation (conv → BatchNorm → ReLU) the layer's
    activation is "identity", so its δ is e·B_l with no f'; the normalization's parameters get
    the gradient that the layer above sends down through its W.
    The taps are forward hooks on the FA layers, active only inside this module's training
    forward (calling ``model`` itself is plain autograd); ``torch.compile(fullgraph=True)``
    traces them once B is drawn (one eager training forward).
    """

    def __init__(self, model: nn.Module, hidden=None, *, init: str = "kaiming", backend: str = "auto"):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if hidden is not None and (isinstance(hidden, nn.Module) or not hasattr(hidden, "__iter__")):
            raise TypeError(f"hidden must be a list of the model's FA layers, got {type(hidden).__name__}; "
                            "for one layer pass [layer]")
        check_backend(backend)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        layers = [m for m in model.modules() if isinstance(m, (FALinear, FAConv2d))]
        hidden = list(hidden) if hidden is not None else layers[:-1]
        if not hidden:
            raise ValueError("DFA needs at least one hidden FALinear or FAConv2d layer below the output layer; "
                             f"{type(model).__name__} has {len(layers)} such layer(s) and hidden={hidden}")
        strangers = [layer for layer in hidden if not any(layer is m for m in layers)]
        if strangers:
            raise ValueError(f"hidden must be FALinear or FAConv2d layers of the model; not in it: {strangers}")
        if len(hidden) == len(layers):
            raise ValueError("hidden names every FA layer of the model: the output layer must be left out")
        self.model = model
        self.init = init
        self.backend = backend
        self._hidden = hidden  # not registered twice: they are modules of self.model
        self._layers = layers
        self.widths: list[int] = []
        # The taps: one forward hook per FA layer, installed once (Dynamo traces hooks that exist
        # before compilation, not ones added inside forward), active only during a training forward.
        self._tapping = [False]
        self._calls: list[nn.Module] = []
        self._taps: list[torch.Tensor] = []
        # (A flag per hook, not a set of ids: a deep copy or a pickle of this module keeps it.)
        hidden_ids = {id(layer) for layer in hidden}
        for layer in layers:
            layer.register_forward_hook(functools.partial(self._tap, id(layer) in hidden_ids))
            layer.mark_dfa("hidden" if id(layer) in hidden_ids else "output")
        self.register_buffer("feedback", torch.empty(0, dtype=hidden[0].weight.dtype, device=hidden[0].weight.device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        loaded = state_dict.get(prefix + "feedback")
        if loaded is not None and loaded.shape != self.feedback.shape:
            self.feedback = torch.empty_like(loaded, device=self.feedback.device)  # a drawn B from a checkpoint
            self.widths = []
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def _draw(self, n_out: int, widths: list[int]) -> None:
        if self.feedback.numel() == 0:  # the first training forward: draw B
            dtype, device = self._hidden[0].weight.dtype, self._hidden[0].weight.device
            self.feedback = torch.empty(n_out, sum(widths), device=device, dtype=dtype)
            start = 0
            for width in widths:
                bound = init_bound(self.init, width, n_out)
                self.feedback[:, start:start + width].uniform_(-bound, bound)
                start += width
        elif self.feedback.shape != (n_out, sum(widths)) or (self.widths and self.widths != widths):
            raise ValueError(f"DFAModel's feedback {tuple(self.feedback.shape)} was drawn for outputs of sizes "
                             f"{self.widths or '?'} and {self.feedback.shape[0]} classes; this input gives sizes "
                             f"{widths} and {n_out} classes. DFA's B is fixed: feed inputs of the size it was drawn "
                             "for, or build a new DFAModel")
        if self.widths != widths:
            self.widths = widths

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same network without DFA's taps: ordinary autograd through every layer."""
        return self.model(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters())
        if not trains:
            return self.model(x)
        self._tapping[0] = True
        try:
            out = self.model(x)
            taps, calls = list(self._taps), list(self._calls)
        finally:  # held no longer than the call (the tapped outputs are the graph's to keep), even on an error
            self._tapping[0] = False
            self._taps.clear()
            self._calls.clear()
        self._check_calls(calls)
        # A sample's size per tapped layer (an empty batch has sizes too).
        self._draw(out.shape[-1], [t.shape[1:].numel() if t.dim() > 1 else t.numel() for t in taps])
        return DFATapFunction.apply(out, self.feedback, resolve(self.backend, out), *taps)

    def _tap(self, is_hidden: bool, module, inputs, output):
        if not self._tapping[0]:
            return None
        self._calls.append(module)
        if is_hidden:
            self._taps.append(output)
            return output.detach()  # the layers above see no graph: the error reaches this one from e only
        return None

    def _check_calls(self, calls: list) -> None:
        # Registration order is not call order: a model may register its head before its body.
        if calls and any(calls[-1] is layer for layer in self._hidden):
            raise ValueError(f"the last FA layer this model ran, {calls[-1]!r}, is in hidden: DFA's output layer "
                             "must not be; pass hidden= (the hidden layers) to DFAModel")
        runs = collections.Counter(id(call) for call in calls)
        odd = [(layer, runs[id(layer)]) for layer in self._hidden if runs[id(layer)] != 1]
        if odd:
            raise ValueError(f"each hidden layer must run exactly once per forward for DFA; (layer, runs): {odd}")
