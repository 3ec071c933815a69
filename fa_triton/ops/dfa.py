"""The autograd of direct feedback alignment (DFA; Nøkland 2016): the output error e reaches
every hidden layer l through a fixed random B_l [n_out, n_l], all projected in one GEMM
(``backend.dfa_delta``). Every tensor a backward reads goes through ``ctx.save_for_backward``, so
an in-place change of B (or of a saved activation) before backward is an error.

- :class:`DFANetworkFunction` (``fa_triton.layers.dfa_network.DFANetwork``): identity on the
  network's output; its backward forms δ_l = (e B_l) ⊙ f_l'(z_l) of every hidden linear layer and
  returns their weight and bias gradients.
- :class:`DFATapFunction` (``fa_triton.layers.dfa_model.DFAModel``): identity on the output;
  its backward sends e B_l, reshaped, into each tapped hidden output, whose own layer then
  applies its f' and forms its gradients.
"""

from __future__ import annotations

import torch

from .autograd import once_differentiable


class DFANetworkFunction(torch.autograd.Function):
    """Inputs: out [..., n_out] (the output layer's, with its own exact gradient), feedback
    [n_out, Σ n_l], saved [M, Σ n_l] (each hidden layer's y or extra tensor, side by side),
    the backend, ((activation, negative_slope) per hidden layer), (n_l per hidden layer), then
    each hidden layer's input h_{l-1} [M, n_{l-1}], then its (weight, bias) -> out.
    """

    @staticmethod
    def forward(ctx, out, feedback, saved, backend, activations, widths, *tensors):
        count = len(widths)
        ctx.save_for_backward(feedback, saved, *tensors[:count])
        ctx.backend, ctx.activations, ctx.widths = backend, activations, widths
        return out.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, error):
        feedback, saved, *inputs = ctx.saved_tensors
        backend, widths = ctx.backend, ctx.widths
        count = len(widths)
        param_needs = ctx.needs_input_grad[6 + count:]
        error2d = error if error.dim() == 2 else error.reshape(-1, error.shape[-1])
        deltas = backend.dfa_delta(error2d, feedback, saved, ctx.activations, widths)
        # Every hidden layer's grad_b in one pass over the contiguous δ [M, Σ n_l] (one launch on
        # the kernels; a slice of δ would be read through its row stride), then each layer's piece.
        grad_bs = [None] * count
        if any(param_needs[1::2]):
            grad_bs = torch.split(backend.local_error(deltas, None, "identity", 0.0, False, True)[1], widths)
        grads = []
        for k, (x, delta) in enumerate(zip(inputs, torch.split(deltas, widths, dim=1))):
            need_w, need_b = param_needs[2 * k], param_needs[2 * k + 1]
            grads += [backend.backward_weight(delta, x) if need_w else None, grad_bs[k] if need_b else None]
        return (error, None, None, None, None, None, *([None] * count), *grads)


class DFATapFunction(torch.autograd.Function):
    """Inputs: out [..., n_out], feedback [n_out, Σ sizes], the backend, then each tapped hidden
    output (any shape; its size per sample is its column count in feedback) -> out."""

    @staticmethod
    def forward(ctx, out, feedback, backend, *taps):
        ctx.save_for_backward(feedback)
        ctx.backend = backend
        ctx.shapes = [t.shape for t in taps]
        ctx.dtypes = [t.dtype for t in taps]  # under autocast, the taps' dtype is not B's
        return out.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, error):
        (feedback,) = ctx.saved_tensors
        error2d = error.reshape(-1, error.shape[-1])
        widths = tuple(int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else int(shape[0]) for shape in ctx.shapes)
        # One GEMM for every tapped layer; each layer's own backward applies its f'.
        projected = ctx.backend.dfa_delta(error2d, feedback, None, (("identity", 0.0),) * len(widths), widths)
        pieces = torch.split(projected, widths, dim=1)
        return (error, None, None, *(p.reshape(shape).to(dtype) for p, shape, dtype in zip(pieces, ctx.shapes,
                                                                                           ctx.dtypes)))
