"""The Triton backend (``backend="triton"``): the layer's steps on the fused kernels of
``fa_triton.kernels`` (CUDA tensors in fp32, fp16 or bf16; CPU tensors through Triton's
interpreter under ``TRITON_INTERPRET=1``). Signatures as in ``reference.py``.

``TRITON_STACKED``: its four layer steps for E models at once (every tensor with the models
first: x [E, M, K], weight [E, N, K], δ [E, M, N], grad_b [E, N]), one stacked launch each
(``kernels.fa_stacked_*``); what a ``torch.func.vmap`` over stacked models runs (the vmap rule of
``fa_triton.ops.library``). Not a ``backend=`` value: it has no DFA or chain steps."""

from __future__ import annotations

from .registry import Backend, kernels, register


def forward(x, weight, bias, activation, negative_slope, store_extra, out=None):
    return kernels().fa_linear_forward(x, weight, bias, activation, negative_slope, store_extra, out)


def local_error(grad_y, saved, activation, negative_slope, need_delta, bias_grad, launcher=None):
    if activation == "identity" and not bias_grad:
        return (grad_y if need_delta else None), None  # δ = g: no pass at all
    store = need_delta and activation != "identity"
    launcher = launcher or kernels().fa_linear_local_error
    delta, grad_b = launcher(grad_y, saved, activation, negative_slope, store_delta=store, bias_grad=bias_grad)
    return (delta if store else grad_y if need_delta else None), grad_b


def backward_input(delta, feedback, weight, counter, rule):
    if not rule.forms_b:  # B is a matrix given as it is: the feedback, or W for backprop
        return kernels().fa_linear_backward_input(delta, None, weight if rule.method == "backprop" else feedback,
                                                  "identity", method=rule.method)
    # The sign methods' B is formed into a buffer for this call only: no B is kept between steps.
    return kernels().fa_linear_backward_input(delta, None, feedback, "identity", method=rule.method, weight=weight,
                                              feedback_scale=rule.scale, seed=rule.seed, counter=counter)


def backward_weight(delta, x):
    return kernels().fa_linear_backward_weight(delta, None, x, "identity", bias_grad=False)[0]


def dfa_delta(error, feedback, saved, activations, widths):
    """One fused launch (e B, f' in the epilogue) per run of consecutive layers sharing an
    activation (``saved`` may be None when every activation is the identity)."""
    delta = feedback.new_empty((error.shape[0], feedback.shape[1]))
    start, i = 0, 0
    while i < len(widths):
        j = i
        while j + 1 < len(widths) and activations[j + 1] == activations[i]:
            j += 1
        stop = start + sum(widths[i:j + 1])
        kernels().fa_linear_dfa_delta(error, feedback[:, start:stop], None if saved is None else saved[:, start:stop],
                                      *activations[i], out=delta[:, start:stop])
        start, i = stop, j + 1
    return delta


def feedback_matrix(weight, feedback, counter, rule, launcher=None):
    """B as the rule forms it: the sign methods' into a buffer for this backward only (one pass;
    ``launcher``: the stacked one for E models)."""
    if rule.method == "backprop":
        return weight
    if not rule.forms_b:
        return feedback
    launcher = launcher or kernels().fa_linear_feedback
    return launcher(weight, feedback, rule.method, feedback_scale=rule.scale, seed=rule.seed, counter=counter)


def chain_forward(x, weights, biases, activations, out=None, stepwise=None):
    """The fused narrow MLP (one launch for every layer) when the chain fits it
    (``kernels.mlp_fusable``: 2 to 4 layers at most 128 wide), else None."""
    if not kernels().mlp_fusable(x, weights, biases):
        return None
    return kernels().fa_mlp_forward(x, weights, biases, [a for a, _ in activations], [s for _, s in activations],
                                    out)


def chain_backward(grad_y, x, outputs, form_feedback, activations, need_grad_x, bias_grads, weight_grads,
                   methods=(), stepwise=None):
    """The fused narrow MLP's backward when the chain fits it (``kernels.mlp_backward_fusable``,
    decided before any B is formed), else None: B_l formed (``form_feedback(l)``; B_1 only for
    grad_x), the δ chain, every grad_b and grad_x in one launch, then every grad_W from one
    grouped launch (each layer's own GEMM above ``tuning.MLP_GROUPED_MAX_ROWS`` rows)."""
    k = kernels()
    if not k.mlp_backward_fusable(grad_y, x, outputs):
        return None
    feedbacks = [form_feedback(i) if i or need_grad_x else None for i in range(len(outputs))]
    deltas, grad_bs, grad_x = k.fa_mlp_backward(grad_y, outputs, feedbacks, [a for a, _ in activations],
                                                [s for _, s in activations], need_grad_x, bias_grads)
    inputs = [x, *outputs[:-1]]
    if grad_y.shape[0] <= k.tuning.MLP_GROUPED_MAX_ROWS:
        grad_ws = k.fa_mlp_weight_grads(deltas, inputs, weight_grads)
    else:
        grad_ws = [backward_weight(delta, h) if want else None for delta, h, want in zip(deltas, inputs, weight_grads)]
    return grad_ws, grad_bs, grad_x


TRITON = register(Backend("triton", forward, local_error, backward_input, backward_weight, dfa_delta,
                          feedback_matrix, chain_forward, chain_backward))


# ------------------------------------------------------------------- one layer's eager calls

class LayerSteps:
    """The four layer steps above for one layer's eager calls (``FALinear``'s fast path, which
    makes one per recorded fit), each remembering the launch plan of its last call and the
    operands' layout it was made for: a call with the same layout runs that plan at once,
    without the launcher's checks and without building and looking up its plan key (together
    4–5 µs of host time per launch on the dev CPU, ``bench/README.md``). Any other call — a new
    batch size, other strides or dtypes, other flags, PyTorch's fp32 matmul precision switched,
    the plans cleared (``kernels.clear_plans``) — runs the step above, whose launcher checks
    everything, and remembers its plan. Layouts are compared at every call, never assumed: a
    ``.data`` assignment can change a parameter's shape, strides or dtype while the object
    stays. Same signatures and results as the steps above (they run the same plans)."""

    __slots__ = ("_forward", "_pass", "_input", "_weight", "_kernels", "_generation")
    name = "triton"

    def __init__(self):
        self._kernels = kernels()
        self._generation = self._kernels.plans.GENERATION  # a one-item list: its value changes when plans are cleared
        # Each: (layout, the plan's runner, the output's sizes) of the last call, or None.
        self._forward = self._pass = self._input = self._weight = None

    def forward(self, x, weight, bias, activation, negative_slope, store_extra, out=None):
        k = self._kernels
        layout = (x.shape, x.stride(), x.dtype, weight.shape, weight.stride(), weight.dtype,
                  None if bias is None else (bias.shape, bias.stride()), None if out is None else out.stride(),
                  activation, store_extra, k.plans.dot_precision(x.dtype), self._generation[0])
        memo = self._forward
        if memo is not None and memo[0] == layout:
            M, N = memo[2]
            y = x.new_empty(M, N) if out is None else out
            extra = x.new_empty(M, N) if store_extra else None
            memo[1](x, weight, bias, y, extra, float(negative_slope))
            return y, extra
        y, extra = forward(x, weight, bias, activation, negative_slope, store_extra, out)
        # An expanded or strided bias is copied by the launcher at every call: not remembered.
        if y.numel() and (bias is None or bias.stride(0) == 1) and (extra is None or extra.is_contiguous()):
            self._remember("_forward", layout, k.launchers.forward_key(x, weight, bias, y, activation, store_extra),
                           y.shape)
        return y, extra

    def local_error(self, grad_y, saved, activation, negative_slope, need_delta, bias_grad):
        if activation == "identity" and not bias_grad:
            return (grad_y if need_delta else None), None  # δ = g: no pass at all
        store = need_delta and activation != "identity"
        layout = (grad_y.shape, grad_y.stride(), grad_y.dtype,
                  None if saved is None else (saved.shape, saved.stride(), saved.dtype), activation, store, bias_grad,
                  self._generation[0])
        memo = self._pass
        if memo is not None and memo[0] == layout:
            M, N = memo[2]
            delta = grad_y.new_empty(M, N) if store else None
            grad_b = grad_y.new_empty(N) if bias_grad else None
            memo[1](grad_y, grad_y if saved is None else saved, grad_y if delta is None else delta, grad_b,
                    float(negative_slope))
        else:
            k = self._kernels
            delta, grad_b = k.fa_linear_local_error(grad_y, saved, activation, negative_slope, store_delta=store,
                                                    bias_grad=bias_grad)
            if grad_y.numel() and (saved is None or saved.shape == grad_y.shape):
                saved_arg, delta_arg = grad_y if saved is None else saved, grad_y if delta is None else delta
                key = k.launchers.local_error_key(grad_y, saved_arg, delta_arg, grad_y.dtype, activation, store,
                                                  bias_grad)
                self._remember("_pass", layout, key, grad_y.shape)
        return (delta if store else grad_y if need_delta else None), grad_b

    def backward_input(self, delta, feedback, weight, counter, rule):
        if not delta.shape[0]:
            return backward_input(delta, feedback, weight, counter, rule)  # an empty batch: no B is formed
        source = feedback_matrix(weight, feedback, counter, rule)  # B as the rule forms it
        layout = (delta.shape, delta.stride(), delta.dtype, source.shape, source.stride(), source.dtype,
                  self._kernels.plans.dot_precision(source.dtype), self._generation[0])
        memo = self._input
        if memo is not None and memo[0] == layout:
            grad_x = source.new_empty(*memo[2])
            memo[1](delta, source, grad_x)
            return grad_x
        k = self._kernels
        grad_x = k.fa_linear_backward_input(delta, None, source, "identity")  # B given as it is
        if grad_x.numel() and delta.dtype is source.dtype:  # else the launcher converted δ first
            self._remember("_input", layout, k.launchers.backward_input_key(delta, source, grad_x), grad_x.shape)
        return grad_x

    def backward_weight(self, delta, x):
        layout = (delta.shape, delta.stride(), delta.dtype, x.shape, x.stride(), x.dtype,
                  self._kernels.plans.dot_precision(x.dtype), self._generation[0])
        memo = self._weight
        if memo is not None and memo[0] == layout:
            grad_w = x.new_empty(*memo[2])
            memo[1](delta, x, grad_w)
            return grad_w
        k = self._kernels
        grad_w = backward_weight(delta, x)
        if grad_w.numel() and delta.shape[0] and delta.dtype is x.dtype:  # else the launcher converted δ first
            self._remember("_weight", layout, k.launchers.backward_weight_key(delta, x, grad_w), grad_w.shape)
        return grad_w

    def _remember(self, step: str, layout: tuple, key: tuple, sizes: tuple) -> None:
        """Keep for ``layout`` the plan the launcher kept for ``key``, if it kept one (it does not
        keep the stand-in config chosen during CUDA-graph capture)."""
        plan = self._kernels.plans.PLANS.get(key)
        if plan is not None:
            setattr(self, step, (layout, plan.run, sizes))


# ------------------------------------------------------------------- E models at once

def stacked_forward(x, weight, bias, activation, negative_slope, store_extra, out=None):
    return kernels().fa_stacked_forward(x, weight, bias, activation, negative_slope, store_extra)


def stacked_local_error(grad_y, saved, activation, negative_slope, need_delta, bias_grad):
    return local_error(grad_y, saved, activation, negative_slope, need_delta, bias_grad,
                       kernels().fa_stacked_local_error)


def stacked_feedback_matrix(weight, feedback, counter, rule):
    """B [E, N, K] as the rule forms it."""
    return feedback_matrix(weight, feedback, counter, rule, kernels().fa_stacked_feedback)


def stacked_backward_input(delta, feedback, weight, counter, rule):
    feedback = stacked_feedback_matrix(weight, feedback, counter, rule)
    return kernels().fa_stacked_backward_input(delta if delta.dtype == feedback.dtype else delta.to(feedback.dtype),
                                               feedback)


def stacked_backward_weight(delta, x):
    return kernels().fa_stacked_backward_weight(delta if delta.dtype == x.dtype else delta.to(x.dtype), x)


def _no_stacked_chain(*args, **kwargs):
    raise NotImplementedError("the stacked Triton steps have no DFA or chain step: E models' chains run layer by layer")


TRITON_STACKED = Backend("triton_stacked", stacked_forward, stacked_local_error, stacked_backward_input,
                         stacked_backward_weight, _no_stacked_chain, stacked_feedback_matrix, _no_stacked_chain,
                         _no_stacked_chain)
