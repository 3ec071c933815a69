"""A chain of FA layers as one autograd Function (``fa_triton.FASequential``).

Per-layer autograd applies each layer's f' to the gradient arriving from above, in a pass of
its own. In a chain, f'_{l-1} belongs in the epilogue of layer l's input GEMM:

    δ_L     = g ⊙ f'_L(z_L)                    one pass, grad_b_L in the same pass
    δ_{l-1} = (δ_l B_l) ⊙ f'_{l-1}(z_{l-1})    one GEMM, f' on the accumulator (l = L … 2)
    grad_W_l = δ_lᵀ h_{l-1},  grad_b_l = Σ_rows δ_l,  grad_x = δ_1 B_1 (only if x needs it)

with h_0 = x and h_l = y_l. The forward is the backend's ``chain_forward`` where it has one
(the kernels' fused narrow MLP: every layer in one launch), else each layer's ``forward``; the
backward likewise ``chain_backward`` (the narrow MLP's δ chain, every grad_b and grad_x in one
launch, every grad_W in one grouped launch), else step by step as above. The chain step is the backends'
``dfa_delta`` (DFA's projection
kernel: e B with f' in its epilogue), B as the layer's rule forms it (``feedback_matrix``). The
forward saves one tensor per layer: y_l, which is both layer l+1's input and what f'_l is read
from (plus the extra tensor where f' cannot be read off y: gelu, leaky_relu with a negative slope).
"""

from __future__ import annotations

import torch

from ..rules.activations import saves_extra
from .autograd import once_differentiable, weight_and_feedback_grads
from .backends import Backend

#: Tensors per layer among the Function's inputs: weight, bias, feedback, counter.
PER_LAYER = 4


class FASequentialFunction(torch.autograd.Function):
    """Inputs: x [..., K_1], the backend (resolved), ``specs`` (per layer: activation,
    negative_slope, rule), then per layer weight [N_l, K_l], bias [N_l] or None, feedback or
    None and counter or None (as the rule needs) -> y_L [..., N_L].

    Inputs are not checked here: ``FASequential`` checks them."""

    @staticmethod
    def forward(ctx, x, backend: Backend, specs, *params):
        count = len(specs)
        lead = x.shape[:-1]
        reference = backend.name == "torch"
        h = x if reference else x.reshape(-1, x.shape[-1])  # the reference takes x [..., K] as it is
        outputs, extras = [], []
        result = None
        if not reference:
            # The result in its final shape, so that it is not a view of a 2-D tensor.
            last = params[PER_LAYER * (count - 1)].shape[0]
            result = x.new_empty((*lead, last))
            if not any(saves_extra(activation, slope) for activation, slope, _ in specs):
                # The whole chain in one launch where the backend has a fused form for it.
                fused = backend.chain_forward(h, list(params[0::PER_LAYER]), list(params[1::PER_LAYER]),
                                              [(activation, slope) for activation, slope, _ in specs],
                                              result.view(-1, last),
                                              stepwise=lambda h=h: _forward_layers(backend, specs, params, h, result))
                if fused is not None:
                    outputs, extras, h = fused[:-1] + [result], [None] * count, result
        if not outputs:
            outputs, extras, h = _forward_layers(backend, specs, params, h, result)
        # The last y is saved only when f'_L is read off it (the others are the next layers' inputs).
        last_activation, last_slope, _ = specs[-1]
        if last_activation == "identity" or saves_extra(last_activation, last_slope):
            outputs[-1] = None
        # B_l's sources: for every layer above the first, and for the first only when x needs
        # a gradient (so an in-place change of its W or B before backward is not an error then).
        first = 0 if ctx.needs_input_grad[0] else 1
        weights = [params[PER_LAYER * i] if i >= first and specs[i][2].reads_weight else None for i in range(count)]
        feedbacks = [params[PER_LAYER * i + 2] if i >= first and specs[i][2].reads_feedback else None
                     for i in range(count)]
        counters = [params[PER_LAYER * i + 3] if i >= first else None for i in range(count)]
        ctx.save_for_backward(x, *outputs, *extras, *weights, *feedbacks, *counters)
        ctx.backend, ctx.specs = backend, specs
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        backend, specs = ctx.backend, ctx.specs
        count = len(specs)
        saved = ctx.saved_tensors
        x, outputs = saved[0], saved[1:1 + count]
        extras, weights = saved[1 + count:1 + 2 * count], saved[1 + 2 * count:1 + 3 * count]
        feedbacks, counters = saved[1 + 3 * count:1 + 4 * count], saved[1 + 4 * count:]
        need = ctx.needs_input_grad

        def flat(t):  # [..., n] -> [M, n] (a 2-D tensor as it is: even a no-op reshape costs a µs)
            return t if t is None or t.dim() == 2 else t.reshape(-1, t.shape[-1])

        def f_source(index):  # what f'_l is read from: y_l, or the extra tensor
            return flat(extras[index]) if extras[index] is not None else flat(outputs[index])

        def stepwise():
            grads = [None] * (PER_LAYER * count)
            activation, slope, rule = specs[-1]
            delta, grad_b = backend.local_error(flat(grad_y), f_source(count - 1), activation, slope, True,
                                                need[3 + PER_LAYER * (count - 1) + 1])
            grad_x = None
            for index in range(count - 1, -1, -1):
                base = 3 + PER_LAYER * index
                rule = specs[index][2]
                need_w, need_feedback = need[base], rule.trains_feedback and need[base + 2]
                grads[PER_LAYER * index + 1] = grad_b
                if need_w or need_feedback:
                    grad_w = backend.backward_weight(delta, flat(x) if index == 0 else flat(outputs[index - 1]))
                    grads[PER_LAYER * index], grads[PER_LAYER * index + 2] = weight_and_feedback_grads(
                        grad_w, need_w, need_feedback)
                if index == 0:
                    if need[0]:
                        grad_x = backend.backward_input(delta, feedbacks[0], weights[0], counters[0], rule)
                        grad_x = grad_x.view(x.shape)
                    break
                below_activation, below_slope, _ = specs[index - 1]
                feedback = backend.feedback_matrix(weights[index], feedbacks[index], counters[index], rule)
                delta = backend.dfa_delta(delta, feedback, f_source(index - 1), ((below_activation, below_slope),),
                                          (feedback.shape[1],))
                below_bias = need[3 + PER_LAYER * (index - 1) + 1]
                grad_b = backend.local_error(delta, None, "identity", 0.0, False, True)[1] if below_bias else None
            return (grad_x, None, None, *grads)

        if all(extra is None for extra in extras):
            fused = _fused_backward(ctx, backend, specs, flat(grad_y), x, [flat(y) for y in outputs], weights,
                                    feedbacks, counters, flat, stepwise)
            if fused is not None:
                return fused
        return stepwise()


def _forward_layers(backend: Backend, specs, params, h, result) -> tuple[list, list, torch.Tensor]:
    """The chain's forward layer by layer: (every y_l, every extra tensor or None, the top y, written
    into ``result`` when given)."""
    count = len(specs)
    outputs, extras = [], []
    for index, (activation, slope, _) in enumerate(specs):
        weight, bias = params[PER_LAYER * index], params[PER_LAYER * index + 1]
        out = result.view(-1, weight.shape[0]) if result is not None and index == count - 1 else None
        h, extra = backend.forward(h, weight, bias, activation, slope, saves_extra(activation, slope), out)
        if out is not None:
            h = result
        outputs.append(h)
        extras.append(extra)
    return outputs, extras, h


def _fused_backward(ctx, backend: Backend, specs, grad_y, x, outputs, weights, feedbacks, counters, flat, stepwise):
    """The chain's backward through the backend's ``chain_backward`` (the kernels' narrow MLP: the
    δ chain, every grad_b and grad_x in one launch, every grad_W in another), or None when the
    backend has no fused form for it (or, for "auto", when ``stepwise``, the step-by-step
    backward, was faster). Returns the Function's gradients."""
    need = ctx.needs_input_grad
    count = len(specs)

    def form_feedback(i):  # B_i as its rule forms it: called only once the backend fuses
        return backend.feedback_matrix(weights[i], feedbacks[i], counters[i], specs[i][2])

    # grad_W_l is wanted for W_l, or for B_l when the rule trains it (kp: B's gradient is W's).
    wants = [(need[3 + PER_LAYER * i], specs[i][2].trains_feedback and need[3 + PER_LAYER * i + 2])
             for i in range(count)]
    fused = backend.chain_backward(grad_y, flat(x), outputs, form_feedback,
                                   [(activation, slope) for activation, slope, _ in specs], need[0],
                                   [need[3 + PER_LAYER * i + 1] for i in range(count)], [w or b for w, b in wants],
                                   tuple(rule.method for _, _, rule in specs), stepwise=stepwise)
    if fused is None:
        return None
    grad_ws, grad_bs, grad_x = fused
    grads = []
    for grad_w, grad_b, (need_w, need_feedback) in zip(grad_ws, grad_bs, wants):
        grad_w, grad_feedback = weight_and_feedback_grads(grad_w, need_w, need_feedback)
        grads += [grad_w, grad_b, grad_feedback, None]
    return (None if grad_x is None else grad_x.view(x.shape), None, None, *grads)
