"""The feedback-alignment family: how each method forms the backward matrix B from W's shape.

==========  ==========================================================================  ==========
method      B (the matrix grad_x = δ B uses)                                           stored
==========  ==========================================================================  ==========
fa          a fixed random matrix (Lillicrap et al. 2014)                               B
backprop    W itself: exact backpropagation, the baseline in the same layer             nothing
usf         s·sign(W), from the current W; s the init's standard deviation (uniform    nothing
            sign symmetry, as BioTorch)
frsf        |R|∘sign(W): fixed random magnitudes R, W's current sign                    R
brsf        |R|∘sign(W) with R redrawn at every training forward, from a seed and a     seed,
            step counter (Philox, the same numbers in the kernels and in PyTorch)       counter
kp          a trainable matrix that receives W's gradient (Kolen–Pollack, Akrout        B
            et al. 2019): with W's weight decay, B and W converge
wm          a matrix moved towards W by a mirror step on noise inputs (weight           B
            mirroring, Akrout et al. 2019), ``FALinear.mirror``
==========  ==========================================================================  ==========

A :class:`FeedbackRule` is what the autograd Functions, the ``torch.library`` ops and the
kernels receive: a hashable constant (the method, its scale and seed). The same ``method``
names the rule from the layer's argument down to the kernels' ``METHOD`` constexpr. For the
methods that form B from W's sign (usf, frsf, brsf) the Triton backend forms B in a buffer
that lives for one backward; the PyTorch reference materializes it with :func:`feedback_matrix`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .philox import philox_uniform

METHODS = ("fa", "backprop", "usf", "frsf", "brsf", "kp", "wm")
#: The methods whose layer holds a feedback tensor (B, or R's magnitudes for frsf).
FEEDBACK_METHODS = ("fa", "frsf", "kp", "wm")
#: The methods whose B is formed from W's sign (the others take B as a matrix: the feedback,
#: or W itself for backprop).
SIGN_METHODS = ("usf", "frsf", "brsf")
INITS = ("kaiming", "xavier")


@dataclass(frozen=True)
class FeedbackRule:
    """How the backward pass gets B (see the module docstring).

    ``method``: one of :data:`METHODS`. ``scale``: s for usf; for brsf the bound b of
    |R| ~ U(0, b). ``seed``: brsf's Philox seed.
    """

    method: str = "fa"
    scale: float = 1.0
    seed: int = 0

    # What the backward reads, fixed by the method: plain attributes (set once here), since they
    # are read at every call of every layer.
    #: B is formed from W's sign (usf, frsf, brsf); else the feedback tensor is B.
    forms_b: bool = field(init=False, repr=False, compare=False)
    #: B depends on W (its sign; or B is W, backprop): the backward needs W.
    reads_weight: bool = field(init=False, repr=False, compare=False)
    #: B depends on the layer's feedback tensor (B itself, or R's magnitudes for frsf).
    reads_feedback: bool = field(init=False, repr=False, compare=False)
    #: B receives grad_W as its gradient (Kolen–Pollack).
    trains_feedback: bool = field(init=False, repr=False, compare=False)
    #: B is redrawn at every training step, from the seed and a draw counter (brsf).
    draws: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"FeedbackRule.method must be one of {METHODS}, got {self.method!r}")
        method = self.method
        for name, value in (("forms_b", method in SIGN_METHODS),
                            ("reads_weight", method in SIGN_METHODS or method == "backprop"),
                            ("reads_feedback", method in FEEDBACK_METHODS), ("trains_feedback", method == "kp"),
                            ("draws", method == "brsf")):
            object.__setattr__(self, name, value)  # frozen: set once


FA_RULE = FeedbackRule()


def rule_for(method: str, feedback_scale: float | None = None, seed: int | None = None) -> FeedbackRule:
    """The FeedbackRule of ``method``."""
    if method in ("usf", "brsf"):
        return FeedbackRule(method, float(feedback_scale), seed or 0)
    return FA_RULE if method == "fa" else FeedbackRule(method)


def check_method(method: str, init: str = "kaiming") -> None:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(init, str) or init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")


def init_std(init: str, fan_in: int, fan_out: int) -> float:
    """The standard deviation of the init's uniform distribution (usf's scale, as BioTorch's):
    1/√(3·fan_in) for kaiming (nn.Linear's U(±1/√fan_in)), √(2/(fan_in+fan_out)) for xavier."""
    return init_bound(init, fan_in, fan_out) / math.sqrt(3.0)


def init_bound(init: str, fan_in: int, fan_out: int) -> float:
    """The bound b of the init's U(-b, b): 1/√fan_in (kaiming, nn.Linear's), √(6/(fan_in+fan_out)) (xavier)."""
    if init == "xavier":
        return math.sqrt(6.0 / (fan_in + fan_out))
    return 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0


def random_magnitudes(seed: int, counter: torch.Tensor, shape: tuple[int, int], scale: float,
                      dtype: torch.dtype) -> torch.Tensor:
    """brsf's |R| [N, K] for draw ``counter`` (an int64 tensor [1]): scale·U(0, 1), element
    (n, k) from Philox offset counter·N·K + n·K + k, as the kernel draws it; the product with
    the scale in ``dtype`` (fp32, as the kernels, or float64)."""
    rows, cols = shape
    index = torch.arange(rows * cols, device=counter.device, dtype=torch.int64).view(rows, cols)
    uniform = philox_uniform(seed, counter.reshape(()) * (rows * cols) + index)
    return uniform.to(dtype) * torch.tensor(scale, dtype=dtype, device=counter.device)


def feedback_matrix(rule: FeedbackRule, weight: torch.Tensor | None, feedback: torch.Tensor | None,
                    counter: torch.Tensor | None) -> torch.Tensor:
    """The B [N, K] that ``rule`` gives, materialized (the reference backend; metrics): the
    feedback tensor for fa, kp and wm, W itself for backprop, formed from W's sign otherwise.

    For the sign methods the magnitude is computed in fp32 (float64 for float64 weights),
    multiplied by W's sign (exact) and rounded once to W's dtype: what the kernels form. A conv
    weight [C_out, C_in, kh, kw] is taken as the matrix [C_out, C_in·kh·kw] (brsf's draw offsets
    follow that order) and B is returned in its shape.
    """
    if rule.method == "backprop":
        return weight
    if not rule.forms_b:
        return feedback
    if weight.dim() != 2:
        flat_feedback = None if feedback is None else feedback.reshape(weight.shape[0], -1)
        return feedback_matrix(rule, weight.reshape(weight.shape[0], -1), flat_feedback, counter).view(weight.shape)
    compute = torch.promote_types(weight.dtype, torch.float32)  # fp32, or float64 for float64 weights
    sign = torch.sign(weight).to(compute)
    if rule.method == "usf":
        return (sign * rule.scale).to(weight.dtype)
    if rule.method == "frsf":
        return (feedback.abs().to(compute) * sign).to(weight.dtype)
    return (random_magnitudes(rule.seed, counter, tuple(weight.shape), rule.scale, compute) * sign).to(weight.dtype)
