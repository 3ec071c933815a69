"""Direct feedback alignment (DFA; Nøkland 2016) over an MLP, as one module: :class:`DFANetwork`
(for any network of FA layers, convolutional ones included, see ``dfa_model.DFAModel``).

The output error e = ∂L/∂output [M, n_out] goes straight to every hidden layer l through a
fixed random matrix B_l [n_out, n_l]: δ_l = (e B_l) ⊙ f'(z_l), grad_W_l = δ_lᵀ h_{l-1},
grad_b_l = Σ_rows δ_l. The output layer gets its exact gradient. No layer waits for the one
above it, and no grad_x is computed below the output layer.

:class:`DFANetwork` keeps every hidden layer's B side by side in one buffer ``feedback``
[n_out, Σ n_l], so the backward projects e to all layers in **one GEMM** (with f' fused: the
Triton kernel ``dfa_delta_kernel``), then runs one weight GEMM per layer. It trains with an
ordinary loop: ``loss = loss_fn(net(x), y); loss.backward()``. Build it with
``fa_triton.convert(model, method="dfa")`` or from FALinear layers.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.backends import check_backend, resolve
from ..ops.dfa import DFANetworkFunction
from ..ops.validation import check_generator, check_layer_input
from ..rules.activations import saves_extra
from ..rules.methods import INITS, init_bound
from .linear import FALinear


class DFANetwork(nn.Module):
    """An MLP trained by direct feedback alignment.

    Args: ``layers``, FALinear layers [in → n_1 → … → n_out] (their own activations; their
    ``method`` is ignored: the output layer's gradient is exact, the hidden layers' comes from
    e through ``feedback``); ``prefix``, a parameter-free module applied to the input first
    (e.g. ``nn.Flatten``); ``backend`` as FALinear's; ``init``: how B is drawn ("kaiming":
    B_l ~ U(±1/√n_l); "xavier": U(±√(6/(n_out+n_l)))).
    Input [..., in] -> output [..., n_out]. Buffer ``feedback`` [n_out, Σ n_l] (B_l side by side,
    in state_dict, never trained).
    """

    def __init__(self, layers, prefix: nn.Module | None = None, *, backend: str = "auto", init: str = "kaiming"):
        super().__init__()
        if isinstance(layers, nn.Module) and not isinstance(layers, (nn.Sequential, nn.ModuleList)) \
                or not hasattr(layers, "__iter__"):
            raise TypeError(f"layers must be a sequence of FALinear layers, got {type(layers).__name__}")
        layers = list(layers)
        if len(layers) < 2 or not all(isinstance(layer, FALinear) for layer in layers):
            raise ValueError(f"DFANetwork needs at least two FALinear layers, got {[type(m).__name__ for m in layers]}")
        if prefix is not None and not isinstance(prefix, nn.Module):
            raise TypeError(f"prefix must be an nn.Module or None, got {type(prefix).__name__}")
        for below, above in zip(layers, layers[1:]):
            if below.out_features != above.in_features:
                raise ValueError(f"layers do not chain: {below.out_features} outputs feed {above.in_features} inputs")
        if prefix is not None and any(True for _ in prefix.parameters()):
            raise ValueError("prefix must have no parameters: DFA's error reaches only the linear layers")
        check_backend(backend)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.prefix = prefix if prefix is not None else nn.Identity()
        self.layers = nn.ModuleList(layers)
        for layer in layers:
            layer.mark_dfa("output" if layer is layers[-1] else "hidden")
        self.backend = backend
        self.init = init
        weight = layers[-1].weight
        self.widths = [layer.out_features for layer in layers[:-1]]
        self.register_buffer("feedback", torch.empty(layers[-1].out_features, sum(self.widths), device=weight.device,
                                                     dtype=weight.dtype))
        self.reset_feedback()

    @torch.no_grad()
    def reset_feedback(self, generator: torch.Generator | None = None) -> None:
        """Draw every B_l from the init's distribution (see the class docstring)."""
        check_generator(generator)
        n_out, start = self.feedback.shape[0], 0
        for width in self.widths:
            bound = init_bound(self.init, width, n_out)
            self.feedback[:, start:start + width].uniform_(-bound, bound, generator=generator)
            start += width

    def feedback_matrices(self) -> list[torch.Tensor]:
        """B_l [n_out, n_l] of each hidden layer (views of ``feedback``)."""
        return list(torch.split(self.feedback, self.widths, dim=1))

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same network without DFA: ordinary autograd through every layer (each by its
        own method; ``fa_triton.metrics.gradient_alignment`` sets them to backprop)."""
        h = self.prefix(x)
        for layer in self.layers:
            h = layer(h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self.layers)  # (slicing the ModuleList would build a new ModuleList per call)
        hidden, output = layers[:-1], layers[-1]
        if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for layer in hidden for t in (layer.weight, layer.bias))):
            return self.plain_forward(x)  # inference (or frozen hidden layers): the plain forward
        h = x if type(self.prefix) is nn.Identity else self.prefix(x)  # (a module call costs a µs or two)
        check_layer_input(h, layers[0].in_features, layers[0].weight,
                          "DFANetwork" + (" (after its prefix)" if not isinstance(self.prefix, nn.Identity) else ""))
        lead = h.shape[:-1]
        if h.dim() != 2:
            h = h.reshape(-1, h.shape[-1])
        backend = resolve(self.backend, h)
        inputs, activations = [], []
        saved = h.new_empty((h.shape[0], sum(self.widths)))
        start = 0
        with torch.no_grad():
            for layer in hidden:
                weight, activation, slope = layer.weight, layer._activation, layer._negative_slope
                width = weight.shape[0]
                inputs.append(h)
                activations.append((activation, slope))
                keeps_extra = saves_extra(activation, slope)
                h, extra = backend.forward(h, weight, layer.bias, activation, slope, keeps_extra)
                saved.narrow(1, start, width).copy_(extra if keeps_extra else h)
                start += width
        out = output(h if len(lead) == 1 else h.view(*lead, h.shape[-1]))  # exact gradient; h carries no graph below
        params = [t for layer in hidden for t in (layer.weight, layer.bias)]
        return DFANetworkFunction.apply(out, self.feedback, saved, backend, tuple(activations), tuple(self.widths),
                                        *inputs, *params)

    def extra_repr(self) -> str:
        return f"backend={self.backend}, init={self.init}, feedback={tuple(self.feedback.shape)}"
