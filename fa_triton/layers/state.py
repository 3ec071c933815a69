"""What a layer of the FA family holds besides its weights, shared by ``FALinear`` and
``FAConv2d``: :class:`FeedbackState` (its B or R, brsf's seed and draw counter, the
initialisation, and the rule its backward uses) and :class:`FusedActivation` (the activation it
fuses, checked whenever it is set).

A layer class mixes them in, provides ``weight``, ``bias`` and ``fans`` ((fan_in, fan_out) of
its weight), and calls :meth:`FeedbackState._register_feedback` and
:meth:`FusedActivation._set_activation` in its ``__init__``.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ..ops.autograd import next_draw
from ..ops.validation import check_generator
from ..rules.activations import check_activation
from ..rules.methods import FEEDBACK_METHODS, FeedbackRule, feedback_matrix, init_bound, init_std, rule_for


class FeedbackState:
    """Mixin for ``nn.Module`` layers of the FA family (see ``fa_triton.methods``)."""

    def _register_feedback(self, method: str, init: str, shape: tuple, factory: dict) -> None:
        """``feedback`` as the method keeps it (a Parameter for kp, a buffer for fa, frsf and wm,
        None otherwise) and brsf's ``feedback_seed`` and ``counter`` buffers."""
        self._method, self._init, self._rule, self._seed = method, init, None, 0
        if method == "kp":
            self.feedback = nn.Parameter(torch.empty(shape, **factory))
        elif method in FEEDBACK_METHODS:
            self.register_buffer("feedback", torch.empty(shape, **factory))
        else:
            self.feedback = None
        if method == "brsf":
            self.register_buffer("feedback_seed", torch.zeros(1, dtype=torch.int64, device=factory.get("device")))
            self.register_buffer("counter", torch.zeros(1, dtype=torch.int64, device=factory.get("device")))

    def materialize_feedback(self, like: torch.Tensor) -> None:
        """New feedback state on ``like``'s device and dtype (a layer built on the meta device,
        whose weight is then another module's), drawn by :meth:`reset_feedback`."""
        factory = {"device": like.device, "dtype": like.dtype}
        if self._method == "kp":
            self.feedback = nn.Parameter(torch.empty(like.shape, **factory))
        elif self.feedback is not None:
            self.feedback = torch.empty(like.shape, **factory)
        if self._method == "brsf":
            self.feedback_seed = torch.zeros(1, dtype=torch.int64, device=like.device)
            self.counter = torch.zeros(1, dtype=torch.int64, device=like.device)
        self.reset_feedback()

    def share_feedback_state(self, other: "FeedbackState") -> None:
        """Use ``other``'s feedback state (B or R, brsf's seed and counter): two layers of one
        weight (an nn.Linear fused two ways by ``convert``) then feed back through one B."""
        if other._method != self._method:
            raise ValueError(f"cannot share the feedback state of a {other._method!r} layer with a "
                             f"{self._method!r} one")
        self.feedback = other.feedback
        if self._method == "brsf":
            self.feedback_seed, self.counter = other.feedback_seed, other.counter
            self._set_seed(other._seed)

    @contextlib.contextmanager
    def backward_as_backprop(self):
        """Within this context the layer's backward is backprop's (B = W), e.g. to compare FA's
        gradients with the true ones (``fa_triton.metrics.gradient_alignment``)."""
        method = self._method
        self._method, self._rule = "backprop", None
        try:
            yield self
        finally:
            self._method, self._rule = method, None

    @contextlib.contextmanager
    def keeping_draws(self):
        """brsf: the draw counter is put back as it was when the context exits (forwards made
        only to measure leave the training's draws alone); nothing for other methods."""
        counter = self.counter.clone() if self._method == "brsf" else None
        try:
            yield self
        finally:
            if counter is not None:
                with torch.no_grad():
                    self.counter.copy_(counter)

    @property
    def method(self) -> str:
        return self._method

    def method_text(self) -> str:
        """The method as a printout shows it: a layer inside a DFA model runs backprop's local
        step, but is trained by DFA (``DFAModel`` marks it through :meth:`mark_dfa`)."""
        role = getattr(self, "_dfa_role", None)
        return f"dfa ({role})" if role else self._method

    def mark_dfa(self, role: str) -> None:
        """Say, in the printout, that this layer is DFA's ``role`` ("hidden" or "output" layer)."""
        self._dfa_role = role

    @property
    def init(self) -> str:
        return self._init

    @property
    def feedback_scale(self) -> float | None:
        """usf: s, the init's standard deviation; brsf: the init's bound b (|R| ~ U(0, b)); else None."""
        if self._method == "usf":
            return init_std(self._init, *self.fans)
        if self._method == "brsf":
            return init_bound(self._init, *self.fans)
        return None

    @property
    def rule(self) -> FeedbackRule:
        """How the backward forms B (``fa_triton.methods.FeedbackRule``)."""
        if torch.compiler.is_compiling():
            # Traced without the cache: the graph would be guarded on its state, and the first
            # eager call's fill would recompile it.
            return self._new_rule()
        rule = self._rule  # cleared by whatever changes the method or the seed
        if rule is None:
            rule = self._rule = self._new_rule()
        return rule

    def _new_rule(self) -> FeedbackRule:
        return rule_for(self._method, self.feedback_scale, self._seed if self._method == "brsf" else None)

    def reset_parameters(self) -> None:
        """The init's weight and bias, then B. kaiming: nn.Linear's and nn.Conv2d's own (the same
        RNG draws, in the same order); xavier: xavier-uniform weight, zero bias (BioTorch's)."""
        fan_in, _ = self.fans
        if self._init == "xavier":
            nn.init.xavier_uniform_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)
        else:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                nn.init.uniform_(self.bias, -bound, bound)
        self.reset_feedback()

    @torch.no_grad()
    def reset_feedback(self, generator: torch.Generator | None = None) -> None:
        """Draw a new B (or R) from the init's distribution: U(±1/√fan_in) for kaiming,
        xavier-uniform for xavier. brsf draws a new seed (and restarts its counter)."""
        check_generator(generator)
        if self.feedback is not None:
            bound = init_bound(self._init, *self.fans)
            self.feedback.uniform_(-bound, bound, generator=generator)
        if self._method == "brsf":
            self._set_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            self.feedback_seed.fill_(self._seed)
            self.counter.zero_()

    def __setstate__(self, state):
        # An unpickled or deep-copied layer forms its rule anew: a pickle written before the
        # seed's writers cleared the cached rule may hold one of an older seed (and FALinear's
        # fast path compares the rule it recorded with this one).
        super().__setstate__(state)
        self._rule = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self._method == "brsf":
            self.sync_seed()

    def sync_seed(self) -> None:
        """brsf: read the seed back from the ``feedback_seed`` buffer (after it was loaded or
        broadcast): the kernels take it as a number, not from the device."""
        self._set_seed(int(self.feedback_seed.item()))

    def _set_seed(self, seed: int) -> None:
        # The cached rule holds the seed: a new one is made at the next read of ``rule``.
        self._seed, self._rule = seed, None

    def _draw(self) -> torch.Tensor | None:
        """brsf: this forward's draw number (advanced on the device by a training forward, so
        CUDA-graph replays redraw too), kept apart for its backward; None for other methods."""
        if self._method != "brsf":
            return None
        if self.training and torch.is_grad_enabled():
            return next_draw(self.counter)
        return self.counter.clone()

    @torch.no_grad()
    def feedback_matrix(self) -> torch.Tensor:
        """B as the backward uses it now, materialized in the weight's shape (metrics, tests): W
        for backprop, s·sign(W), |R|·sign(W), or brsf's latest draw."""
        weight = self.weight.detach()
        if self._method == "backprop":
            return weight
        feedback = None if self.feedback is None else self.feedback.detach()
        return feedback_matrix(self.rule, weight, feedback, getattr(self, "counter", None))


class FusedActivation:
    """Mixin for layers that fuse an activation: ``activation`` and ``negative_slope``, checked
    whenever they are set (at construction and later), so a misspelt name is never a silent
    identity. The layer calls ``_set_activation`` in its ``__init__``."""

    def _set_activation(self, activation: str, negative_slope: float) -> None:
        check_activation(activation, negative_slope)
        self._activation, self._negative_slope = activation, float(negative_slope)

    @property
    def activation(self) -> str:
        return self._activation

    @activation.setter
    def activation(self, value: str) -> None:
        self._set_activation(value, self._negative_slope)

    @property
    def negative_slope(self) -> float:
        return self._negative_slope

    @negative_slope.setter
    def negative_slope(self, value: float) -> None:
        self._set_activation(self._activation, value)
