"""The feedback-alignment family: how each rule forms the backward matrix B from W's shape.

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
kernels receive: a hashable constant (kind, scale, seed, whether B trains). For the kinds that
form B (sign, magnitude_sign, random_sign) the Triton kernel forms each tile of B from W as it
loads it; the PyTorch reference materializes B with :func:`feedback_matrix`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

METHODS = ("fa", "backprop", "usf", "frsf", "brsf", "kp", "wm")
#: The methods whose layer holds a feedback tensor (B, or R's magnitudes for frsf).
FEEDBACK_METHODS = ("fa", "frsf", "kp", "wm")
INITS = ("kaiming", "xavier")
#: How the backward forms B: given ("matrix"), s·sign(W), |R|·sign(W), or |R|·sign(W) with R drawn.
KINDS = ("matrix", "sign", "magnitude_sign", "random_sign")


@dataclass(frozen=True)
class FeedbackRule:
    """How the backward pass gets B (see the module docstring).

    ``kind``: one of :data:`KINDS`. ``scale``: s for "sign"; for "random_sign" the bound b of
    |R| ~ U(0, b). ``seed``: "random_sign"'s Philox seed. ``trains_feedback``: B receives grad_W
    as its gradient (Kolen–Pollack).
    """

    kind: str = "matrix"
    scale: float = 1.0
    seed: int = 0
    trains_feedback: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"FeedbackRule.kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def reads_weight(self) -> bool:
        """B depends on W's sign (the backward needs W)."""
        return self.kind != "matrix"

    @property
    def reads_feedback(self) -> bool:
        """B depends on the stored feedback tensor (B itself, or R's magnitudes)."""
        return self.kind in ("matrix", "magnitude_sign")


FA_RULE = FeedbackRule()


def rule_for(method: str, feedback_scale: float | None = None, seed: int | None = None) -> FeedbackRule:
    """The FeedbackRule of ``method`` (backprop's B is W itself, passed as the feedback)."""
    if method == "usf":
        return FeedbackRule("sign", float(feedback_scale))
    if method == "frsf":
        return FeedbackRule("magnitude_sign")
    if method == "brsf":
        return FeedbackRule("random_sign", float(feedback_scale), seed)
    if method == "kp":
        return FeedbackRule(trains_feedback=True)
    return FA_RULE


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


# ------------------------------------------------------------------------------- Philox

_MASK32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32 bits of a·b for a, b < 2³², in int64 without overflow: b is split in
    16-bit halves, so each partial product stays below 2⁴⁸."""
    low_part = a * (b & 0xFFFF)
    high_part = a * (b >> 16)
    high = ((low_part >> 16) + high_part) >> 16
    low = (low_part + ((high_part & 0xFFFF) << 16)) & _MASK32
    return high, low


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """float32 in [0, 1), bitwise what Triton's ``tl.rand(seed, offsets)`` gives for int64 offsets.

    Philox-4x32 with 10 rounds on counter (offset low, offset high, 0, 0) and key (seed low,
    seed high), then Triton's int32-to-uniform conversion. Integer arithmetic in int64 tensors;
    the last step is one int-to-float conversion and one fp32 multiply, as in the kernel.
    """
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        high_2, low_2 = _mul32(c2, 0xCD9E8D57)
        high_0, low_0 = _mul32(c0, 0xD2511F53)
        c0 = high_2 ^ c1 ^ k0
        c2 = high_0 ^ c3 ^ k1
        c1, c3 = low_2, low_0
        k0 = (k0 + 0x9E3779B9) & _MASK32
        k1 = (k1 + 0xBB67AE85) & _MASK32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # the bits as int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=offsets.device)


def random_magnitudes(seed: int, counter: torch.Tensor, shape: tuple[int, int], scale: float,
                      dtype: torch.dtype) -> torch.Tensor:
    """brsf's |R| [N, K] for draw ``counter`` (an int64 tensor [1]): scale·U(0, 1), element
    (n, k) from Philox offset counter·N·K + n·K + k, as the kernel draws it."""
    rows, cols = shape
    index = torch.arange(rows * cols, device=counter.device, dtype=torch.int64).view(rows, cols)
    uniform = philox_uniform(seed, counter.reshape(()) * (rows * cols) + index)
    return (uniform * torch.tensor(scale, dtype=torch.float32, device=counter.device)).to(dtype)


def feedback_matrix(rule: FeedbackRule, weight: torch.Tensor | None, feedback: torch.Tensor | None,
                    counter: torch.Tensor | None) -> torch.Tensor:
    """The B [N, K] that ``rule`` gives, materialized (the reference backend; metrics).

    Each value is what the kernels form in their tiles: the magnitude in fp32, multiplied by W's
    sign (exact), rounded once to W's dtype. A conv weight [C_out, C_in, kh, kw] is taken as the
    matrix [C_out, C_in·kh·kw] (brsf's draw offsets follow that order) and B is returned in its shape.
    """
    if rule.kind == "matrix":
        return feedback
    if weight.dim() != 2:
        flat_feedback = None if feedback is None else feedback.reshape(weight.shape[0], -1)
        return feedback_matrix(rule, weight.reshape(weight.shape[0], -1), flat_feedback, counter).view(weight.shape)
    sign = torch.sign(weight)
    if rule.kind == "sign":
        return (sign * rule.scale).to(weight.dtype)
    if rule.kind == "magnitude_sign":
        return (feedback.abs().float() * sign).to(weight.dtype)
    return random_magnitudes(rule.seed, counter, tuple(weight.shape), rule.scale, torch.float32).mul(sign).to(
        weight.dtype)
