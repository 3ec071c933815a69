"""Direct feedback alignment (DFA; Nøkland 2016) over an MLP, as one module.

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

import collections
import functools

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .activations import activation_backward, saves_extra
from .backend import BY_NAME, check_backend, kernels, resolve_backend
from .methods import INITS, init_bound
from .modules import FALinear


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
        layers = list(layers)
        if len(layers) < 2 or not all(isinstance(layer, FALinear) for layer in layers):
            raise ValueError(f"DFANetwork needs at least two FALinear layers, got {[type(m).__name__ for m in layers]}")
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
        h = self.prefix(x)
        hidden, output = self.layers[:-1], self.layers[-1]
        trains = torch.is_grad_enabled() and any(p.requires_grad for layer in hidden for p in layer.parameters())
        if not trains:  # inference: the plain forward
            return self.plain_forward(x)
        lead = h.shape[:-1]
        h = h.reshape(-1, h.shape[-1])
        backend = BY_NAME[resolve_backend(self.backend, h)]
        inputs, saved = [], []
        saved_all = torch.empty(h.shape[0], sum(self.widths), device=h.device, dtype=h.dtype)
        with torch.no_grad():
            for layer, piece in zip(hidden, torch.split(saved_all, self.widths, dim=1)):
                inputs.append(h)
                keeps_extra = saves_extra(layer.activation, layer.negative_slope)
                if backend.name == "triton" and not keeps_extra:
                    # y written straight into its slice of the saved buffer (the kernels take its row stride).
                    kernels().fa_linear_forward(h, layer.weight, layer.bias, layer.activation, layer.negative_slope,
                                                False, piece)
                    h = piece
                else:
                    h, extra = backend.forward(h, layer.weight, layer.bias, layer.activation, layer.negative_slope,
                                               keeps_extra)
                    piece.copy_(extra if keeps_extra else h)
                saved.append(piece)
        out = output(h.view(*lead, h.shape[-1]))  # exact gradient; h carries no graph below
        params = [t for layer in hidden for t in (layer.weight, layer.bias)]
        return _DFAFunction.apply(out, self, backend, inputs, saved_all, *params)

    def extra_repr(self) -> str:
        return f"backend={self.backend}, init={self.init}, feedback={tuple(self.feedback.shape)}"


def dfa_deltas(backend_name: str, error: torch.Tensor, feedback: torch.Tensor, saved_all: torch.Tensor,
               layers, widths: list[int]) -> torch.Tensor:
    """δ [M, Σ n_l] of every hidden layer: (e B) ⊙ f', one GEMM (per run of layers sharing an
    activation, on Triton with f' fused; the reference multiplies once and applies f' per layer)."""
    if backend_name == "reference":
        projected = error @ feedback
        pieces = zip(torch.split(projected, widths, dim=1), torch.split(saved_all, widths, dim=1), layers)
        return torch.cat([activation_backward(p, s, layer.activation, layer.negative_slope) for p, s, layer in pieces],
                         dim=1)
    delta = torch.empty_like(saved_all)
    start, i = 0, 0
    while i < len(widths):  # runs of consecutive layers with one activation: one launch each
        j, act, slope = i, layers[i].activation, layers[i].negative_slope
        while j + 1 < len(widths) and (layers[j + 1].activation, layers[j + 1].negative_slope) == (act, slope):
            j += 1
        stop = start + sum(widths[i:j + 1])
        kernels().fa_linear_dfa_delta(error, feedback[:, start:stop], saved_all[:, start:stop], act, slope,
                                      out=delta[:, start:stop])
        start, i = stop, j + 1
    return delta


class _DFAFunction(torch.autograd.Function):
    """Identity on the network's output; its backward receives e and returns the hidden
    layers' weight and bias gradients (the output layer's come from its own autograd)."""

    @staticmethod
    def forward(ctx, out, network, backend, inputs, saved_all, *params):
        ctx.network, ctx.backend, ctx.inputs, ctx.saved_all = network, backend, inputs, saved_all
        ctx.param_needs = [p is not None and p.requires_grad for p in params]
        return out.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, error):
        network, backend = ctx.network, ctx.backend
        hidden = network.layers[:-1]
        error2d = error.reshape(-1, error.shape[-1])
        deltas = dfa_deltas(backend.name, error2d, network.feedback, ctx.saved_all, hidden, network.widths)
        grads = []
        for k, (x, delta) in enumerate(zip(ctx.inputs, torch.split(deltas, network.widths, dim=1))):
            need_w, need_b = ctx.param_needs[2 * k], ctx.param_needs[2 * k + 1]
            if need_w or need_b:
                _, grad_b = backend.local_error(delta, None, "identity", 0.0, False, need_b)
                grads += [backend.backward_weight(delta, x) if need_w else None, grad_b]
            else:
                grads += [None, None]
        return (error, None, None, None, None, *grads)


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

    def __init__(self, model: nn.Module, hidden=None, *, init: str = "kaiming"):
        super().__init__()
        from .conv import FAConv2d

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
        self._draw(out.shape[-1], [t[0].numel() if t.dim() > 1 else t.numel() for t in taps])
        return _DFATap.apply(out, self.feedback, len(taps), *taps)

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


class _DFATap(torch.autograd.Function):
    """Identity on the network's output; its backward sends e·B_l, reshaped, into each tapped output."""

    @staticmethod
    def forward(ctx, out, feedback, count, *taps):
        ctx.feedback = feedback
        ctx.shapes = [t.shape for t in taps]
        return out.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, error):
        error2d = error.reshape(-1, error.shape[-1])
        projected = error2d @ ctx.feedback.to(error2d.dtype)  # one GEMM for every hidden layer
        widths = [int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else int(shape[0]) for shape in ctx.shapes]
        pieces = torch.split(projected, widths, dim=1)
        return (error, None, None, *(p.reshape(shape) for p, shape in zip(pieces, ctx.shapes)))
