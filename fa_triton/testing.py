"""Parity testing for feedback-alignment layers: check an FA variant or a kernel of your own the
way fa_triton checks its own layers and kernels (its test suite uses this module).

The pieces:

- **The float64 oracle**, written from the equations (not from the code under test):
  :func:`oracle` (one layer), :func:`conv2d_oracle`, :func:`dfa_oracle`, :func:`local_error`,
  :func:`activation_and_derivative`; B of every rule of the FA family from the rule's own
  equations: :func:`oracle_feedback`, :func:`layer_feedback`, :func:`rule_scale`, :func:`fans`.
- **The tolerance policy**: :func:`assert_parity` (an ``assert_close`` that names the tensor,
  the worst element, its bound), with fixed bounds: :data:`FLOAT64_TOLERANCE` for float64 and
  elementwise bounds derived from rounding for fp32, tf32, fp16 and bf16 (:func:`layer_bounds`,
  :func:`dfa_bounds`, :func:`local_error_bounds`, :func:`tf32_bounds`).
- **Checks on B**: :func:`feedback_from_backward` (B as a layer's backward really applies it),
  :func:`assert_feedback_rule` (|B| and sign(B) as the rule says), :func:`assert_uses_feedback`
  (grad_x is δ·B, not backprop's δ·W).
- :func:`gradcheck_fa`: ``torch.autograd.gradcheck`` where FA's gradient is the true one.

The equations of one layer: z = x Wᵀ + b, y = f(z), δ = g ⊙ f'(z) (g = ∂L/∂y), grad_x = δ B,
grad_W = δᵀ x, grad_b = Σ_rows δ. Direct feedback alignment (DFA): hidden layer l gets
δ_l = (e B_l) ⊙ f_l'(z_l) from the output error e, grad_W_l = δ_lᵀ h_{l-1}; the output layer
its exact gradient. B of each rule: fa, kp, wm: the feedback tensor; backprop: W; usf:
s·sign(W) with s the init's standard deviation (kaiming: 1/√(3·fan_in), xavier:
√(2/(fan_in+fan_out))); frsf: |R|·sign(W) with R the stored feedback tensor; brsf:
|R|·sign(W) with R = b·U(0, 1) redrawn per training step, b the init's bound (kaiming:
1/√fan_in, xavier: √(6/(fan_in+fan_out))), element (n, k) of draw ``counter`` from Philox at
offset counter·N·K + n·K + k (``fa_triton.rules.philox.philox_uniform``, which the test suite
checks bit for bit against Triton's ``tl.rand``).

Imports neither pytest nor Triton and needs no GPU.

Tolerance policy
----------------

Bounds are **fixed**: they depend on the inputs, the dtype and the equations, never on how far
another implementation (PyTorch's) happens to be from the oracle, so a bug shared by two
backends fails both.

*float64*: |got − oracle| ≤ ``FLOAT64_TOLERANCE`` · max(1, max |oracle|) = 1e-12 · max(1,
max |oracle|) per tensor. Float64's own worst-case rounding (the rules below with u = 2⁻⁵³:
``layer_bounds(..., dtype=torch.float64)``) stays below it for layers up to a few hundred wide
(the suite checks this at its float64 shapes; at 784 → 128 the worst case reaches 2e-12, though
actual errors are near 1e-15: pass ``bounds=layer_bounds(..., dtype=torch.float64)`` for wide
float64 layers). A real bug — a wrong B, a wrong f', a factor of 1.001 — is orders of magnitude
above it.

*fp32, tf32, fp16, bf16*: each element of y, grad_x, grad_W, grad_b must lie within its own
bound, propagated through the layer's equations from these rules (u: the unit roundoff of the
dtype, 2⁻²⁴ fp32, 2⁻¹¹ fp16, 2⁻⁸ bf16; a = 2⁻²³: the fp32 accumulator's, twice fp32's unit
roundoff, which also covers round-toward-zero accumulation as tensor cores do it; t: the tf32
operand truncation, 2⁻¹⁰, else 0; η: the dtype's smallest subnormal; γ_n = n·a / (1 − n·a)):

1. A dot product of length n over operands A ± e_A, B ± e_B (each element known to within its
   error bound) is off by at most
   ``((1+t)²(1+γ_{n+1}) − 1)·(|A|+e_A)(|B|+e_B) + e_A(|B|+e_B) + |A| e_B``
   (Higham's bound for a sum of n products in any order — split-K and tiling included — with
   one rounding per product; the operands' own errors carried through).
   z = x Wᵀ + b is a dot of length K+1 (the bias is one more term).
2. A value rounded to the dtype gains u·|value| + η/2. z may be rounded up to twice (the GEMM's
   result and the bias add, as PyTorch's half-precision ops do); y, δ (the backward GEMMs'
   operand), grad_x, grad_W and grad_b once each.
3. f is evaluated in fp32 or better: error ≤ C_f·a·(1 + |z| + |y|); f is L_f-Lipschitz, so
   |f(ẑ) − f(z)| ≤ L_f·e_z. f' is read off the saved y (tanh: 1 − y², sigmoid: y(1 − y), with
   |d f'/dy| ≤ H_f), or computed from z (|f''| ≤ L'_f), with N_f more roundings in the dtype
   (PyTorch's backward in fp16 forms 1 − y·y in two fp16 ops, within 2u; gelu's f'(z) = Φ(z) + zφ(z)
   in ten, within 4u: 1.74u from Φ's part, 0.96u from zφ's, 1.13u from the sum).
   ``ACTIVATION_ERROR_MODELS`` holds (L_f, L'_f, H_f, C_f, N_f) for each activation.
4. Relu and leaky_relu have a kink at 0: where |z| ≤ e_z + η the computed z may lie on the other
   side, and δ's bound there includes |g|·|1 − α| (tests usually zero g there: ``kink``).
5. B formed by a sign rule (usf, frsf, brsf) is the oracle's B rounded up to three times
   (the scale, the product, the dtype): e_B = γ₃(u)·|B|. A given B (fa, kp, wm, backprop) is exact.
6. grad_b = Σ_rows δ: γ_M·Σ(|δ| + e_δ) + Σ e_δ, then one rounding.

So, to first order, a fp32 GEMM output may be off by about (K+1)·2⁻²³ times the sum of the
absolute products, and a fp16 or bf16 output by one unit roundoff of itself plus its operands'
rounding carried through — the kernels accumulate in fp32, so in 16 bits the output and
operand roundings dominate. The bounds are worst cases: the suite checks that they hold
(against the kernels, PyTorch, emulated tf32) and that they are tight enough to catch a
coarser rounding (``tests/test_testing.py``, ``tests/test_oracle.py``).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import nn

from .rules.philox import philox_uniform

__all__ = [
    "ACTIVATION_ERROR_MODELS",
    "FLOAT64_TOLERANCE",
    "METHODS",
    "OUTPUTS",
    "SMALLEST_SUBNORMAL",
    "TF32_UNIT",
    "UNIT_ROUNDOFF",
    "ActivationErrorModel",
    "activation_and_derivative",
    "assert_feedback_rule",
    "assert_parity",
    "assert_uses_feedback",
    "conv2d_oracle",
    "dfa_bounds",
    "dfa_oracle",
    "fans",
    "feedback_from_backward",
    "gradcheck_fa",
    "layer_bounds",
    "layer_feedback",
    "layer_oracle",
    "local_error",
    "local_error_bounds",
    "oracle",
    "oracle_feedback",
    "rule_scale",
    "tf32_bounds",
]

#: The rules of the FA family this module builds B for.
METHODS = ("fa", "backprop", "usf", "frsf", "brsf", "kp", "wm")
SIGN_METHODS = ("usf", "frsf", "brsf")
#: What a layer test compares: the output and the three gradients.
OUTPUTS = ("y", "grad_x", "grad_weight", "grad_bias")

#: Unit roundoff u (half the distance from 1 to the next number) of each floating dtype.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
#: The smallest positive subnormal of each dtype: a rounding near 0 is off by at most half of it.
SMALLEST_SUBNORMAL = {torch.float64: 2.0**-1074, torch.float32: 2.0**-149, torch.float16: 2.0**-24,
                      torch.bfloat16: 2.0**-133}
#: tf32 keeps 10 of fp32's 23 mantissa bits; truncated (as tensor cores read fp32 words) its
#: relative error is at most 2⁻¹⁰ (2⁻¹¹ rounded to nearest): the bounds take truncation.
TF32_UNIT = 2.0**-10
#: The fp32 accumulator's unit in the bounds: 2⁻²³, twice fp32's unit roundoff (round toward zero).
FP32_ACCUMULATION_UNIT = 2.0**-23
#: float64 parity: |got − oracle| ≤ FLOAT64_TOLERANCE · max(1, max |oracle|).
FLOAT64_TOLERANCE = 1e-12


class ActivationErrorModel(NamedTuple):
    """The constants of one activation in the rounding analysis (see the module docstring)."""

    lipschitz: float  #: L_f ≥ max |f'|
    curvature: float  #: L'_f ≥ max |f''| away from a kink
    from_output: float  #: H_f ≥ max |d f'/dy| where f' is read off y (tanh, sigmoid), else 0
    evaluation: float  #: C_f: f evaluated in fp32 within C_f·a·(1 + |z| + |y|)
    derivative_ops: float  #: N_f: roundings in the dtype (of values ≤ 1) in forming f' from what was saved
    kinked: bool  #: f' jumps at z = 0 (relu, leaky_relu)


ACTIVATION_ERROR_MODELS = {
    "relu": ActivationErrorModel(1.0, 0.0, 0.0, 0.0, 0.0, True),
    "leaky_relu": ActivationErrorModel(1.0, 0.0, 0.0, 1.0, 0.0, True),  # L_f: max(1, |α|), at use
    "tanh": ActivationErrorModel(1.0, 0.77, 2.0, 10.0, 2.0, False),  # |tanh''| ≤ 4/(3√3)
    "sigmoid": ActivationErrorModel(0.25, 0.1, 1.0, 10.0, 2.0, False),  # |σ''| ≤ 1/(6√3)
    "gelu": ActivationErrorModel(1.13, 0.8, 0.0, 10.0, 5.0, False),  # gelu' ≤ 1.129, |gelu''| ≤ 2φ(0)
    "identity": ActivationErrorModel(1.0, 0.0, 0.0, 0.0, 0.0, False),
}


# ------------------------------------------------------------------------------ the oracle

def activation_and_derivative(z: torch.Tensor, activation: str, negative_slope: float = 0.01):
    """f(z) and f'(z) from their definitions, in z's dtype (float64 for the oracle)."""
    if activation == "relu":
        return torch.where(z > 0, z, 0.0), (z > 0).to(z.dtype)
    if activation == "leaky_relu":
        one = torch.ones_like(z)
        return torch.where(z > 0, z, negative_slope * z), torch.where(z > 0, one, negative_slope * one)
    if activation == "tanh":
        t = torch.tanh(z)
        return t, 1 - t * t
    if activation == "sigmoid":
        s = 1 / (1 + torch.exp(-z))
        return s, s * (1 - s)
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
        pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        return z * cdf, cdf + z * pdf
    if activation == "identity":
        return z, torch.ones_like(z)
    raise ValueError(f"activation must be one of {tuple(ACTIVATION_ERROR_MODELS)}, got {activation!r}")


def _double(t):
    return None if t is None else t.detach().double()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., n] as a matrix [rows, n] (also when n or the rows are 0)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def local_error(x, weight, bias, grad_y, activation="relu", negative_slope=0.01):
    """(z, δ) of one layer in float64: z = x Wᵀ + b and δ = g ⊙ f'(z), shaped as grad_y."""
    z = _double(x) @ _double(weight).t()
    if bias is not None:
        z = z + _double(bias)
    return z, _double(grad_y) * activation_and_derivative(z, activation, negative_slope)[1]


def oracle(x, weight, bias, feedback, grad_y, activation="relu", negative_slope=0.01) -> dict:
    """y, grad_x, grad_W, grad_b of the FA layer in float64, from the equations.

    x [..., K], weight and feedback (B itself: see :func:`oracle_feedback`) [N, K], bias [N] or
    None, grad_y [..., N]. z = x Wᵀ + b, y = f(z), δ = g ⊙ f'(z), grad_x = δ B, grad_W = δᵀ x,
    grad_b = Σ_rows δ. Returns {"y", "grad_x", "grad_weight", "grad_bias"} (grad_bias None
    without a bias).
    """
    x64 = _double(x)
    z, delta = local_error(x64, weight, bias, grad_y, activation, negative_slope)
    y = activation_and_derivative(z, activation, negative_slope)[0]
    delta2d, x2d = _rows(delta), _rows(x64)
    return {
        "y": y,
        "grad_x": delta @ _double(feedback),
        "grad_weight": delta2d.t() @ x2d,
        "grad_bias": delta2d.sum(0) if bias is not None else None,
    }


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def conv2d_oracle(x, weight, bias, feedback, grad_y, stride=1, padding=0, dilation=1, groups=1,
                  activation="identity", negative_slope=0.01) -> dict:
    """The FA convolution's y, grad_x, grad_W, grad_b in float64, from im2col matmuls.

    x [N, C_in, H, W] (padded already, for paddings other than symmetric zeros), weight and
    feedback (B) [C_out, C_in/groups, kh, kw]: the layer's equations on the unfolded input
    (z = W cols + b per group; grad_cols = Bᵀ δ folded back; grad_W = δ colsᵀ).
    """
    x, weight, B, grad_y = _double(x), _double(weight), _double(feedback), _double(grad_y)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    n, _, h, w = x.shape
    c_out, c_group, kh, kw = weight.shape
    geometry = dict(kernel_size=(kh, kw), dilation=dilation, padding=padding, stride=stride)
    cols = torch.nn.functional.unfold(x, **geometry)  # [N, C_in·kh·kw, L]
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out_g, rows = c_out // groups, c_group * kh * kw

    def per_group(g):
        return slice(g * out_g, (g + 1) * out_g), slice(g * rows, (g + 1) * rows)

    z = torch.cat([weight[o].reshape(out_g, rows) @ cols[:, r] for o, r in map(per_group, range(groups))], dim=1)
    if bias is not None:
        z = z + _double(bias)[None, :, None]
    y, fprime = activation_and_derivative(z, activation, negative_slope)
    delta = grad_y.reshape(n, c_out, -1) * fprime
    grad_cols = torch.cat([B[o].reshape(out_g, rows).t() @ delta[:, o] for o, _ in map(per_group, range(groups))],
                          dim=1)
    grad_w = torch.cat([(delta[:, o] @ cols[:, r].transpose(1, 2)).sum(0).reshape(out_g, c_group, kh, kw)
                        for o, r in map(per_group, range(groups))])
    return {
        "y": y.reshape(n, c_out, h_out, w_out),
        "grad_x": torch.nn.functional.fold(grad_cols, (h, w), **geometry),
        "grad_weight": grad_w,
        "grad_bias": delta.sum((0, 2)) if bias is not None else None,
    }


def _dfa_parts(layers, feedback):
    """[(weight, bias, activation, negative_slope)] of the layers and B_l [n_out, n_l] of each hidden one."""
    parts = [(layer.weight, layer.bias, layer.activation, layer.negative_slope) for layer in layers]
    B = _double(feedback)
    widths = [weight.shape[0] for weight, *_ in parts[:-1]]
    if B.shape != (parts[-1][0].shape[0], sum(widths)):
        raise ValueError(f"feedback must be [n_out, Σ n_l] = [{parts[-1][0].shape[0]}, {sum(widths)}] for hidden "
                         f"widths {widths}, got {tuple(B.shape)}")
    return parts, list(torch.split(B, widths, dim=1))


def dfa_oracle(layers, feedback, x, error) -> dict:
    """Direct feedback alignment over an MLP in float64, from its equations.

    ``layers``: the layers in order (each with ``weight`` [n_l, n_{l-1}], ``bias``, ``activation``,
    ``negative_slope``: FALinear); ``feedback`` [n_out, Σ n_l], B_l of the hidden layers side by
    side in layer order (``DFANetwork.feedback``); ``x`` [M, in] (after any prefix such as a
    flatten); ``error`` e [M, n_out] (the upstream gradient of the output).

    Forward h_l = f_l(h_{l-1} W_lᵀ + b_l); hidden layers δ_l = (e B_l) ⊙ f_l'(z_l), the output
    layer δ_L = e ⊙ f_L'(z_L); grad_W_l = δ_lᵀ h_{l-1}, grad_b_l = Σ_rows δ_l. Returns
    {"y": h_L} and the gradients keyed as ``DFANetwork.named_parameters()`` names the
    parameters: "layers.{l}.weight", "layers.{l}.bias" (None without a bias).
    """
    parts, feedbacks = _dfa_parts(layers, feedback)
    h, inputs, zs = _double(x), [], []
    for weight, bias, activation, slope in parts:
        inputs.append(h)
        z = h @ _double(weight).t() + (_double(bias) if bias is not None else 0)
        zs.append(z)
        h = activation_and_derivative(z, activation, slope)[0]
    e = _double(error)
    out = {"y": h}
    for index, ((_, bias, activation, slope), z, h_in) in enumerate(zip(parts, zs, inputs)):
        projected = e @ feedbacks[index] if index < len(feedbacks) else e
        delta = projected * activation_and_derivative(z, activation, slope)[1]
        out[f"layers.{index}.weight"] = delta.t() @ h_in
        out[f"layers.{index}.bias"] = delta.sum(0) if bias is not None else None
    return out


# ------------------------------------------------------------------------ B from the rules

def fans(weight: torch.Tensor) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight [out, in, *kernel], as ``torch.nn.init`` counts them."""
    receptive = math.prod(weight.shape[2:])
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def rule_scale(method: str, init: str, fan_in: int, fan_out: int) -> float | None:
    """The scale a rule takes from the init, or None: usf's s, the standard deviation of the
    init's uniform distribution (kaiming 1/√(3·fan_in), xavier √(2/(fan_in+fan_out))); brsf's
    b, the bound of that distribution, |R| ~ b·U(0, 1) (kaiming 1/√fan_in, xavier
    √(6/(fan_in+fan_out)))."""
    if init not in ("kaiming", "xavier"):
        raise ValueError(f"init must be 'kaiming' or 'xavier', got {init!r}")
    if method == "usf":
        if init == "xavier":
            return math.sqrt(2.0 / (fan_in + fan_out))
        return 1.0 / math.sqrt(3.0 * fan_in) if fan_in > 0 else 0.0
    if method == "brsf":
        if init == "xavier":
            return math.sqrt(6.0 / (fan_in + fan_out))
        return 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return None


def _int(value) -> int:
    return int(value.reshape(-1)[0].item()) if isinstance(value, torch.Tensor) else int(value)


def oracle_feedback(method: str, weight: torch.Tensor, feedback: torch.Tensor | None = None, *,
                    init: str = "kaiming", scale: float | None = None, seed=None, counter=None) -> torch.Tensor:
    """B [weight's shape] in float64, from the equations of ``method`` (see the module docstring).

    ``feedback``: B itself for fa, kp, wm; R for frsf. ``scale``: usf's s or brsf's b (default:
    :func:`rule_scale` of ``init`` and the weight's fans). brsf: ``seed`` and ``counter`` (ints or
    tensors; the draw: the counter's value after the training forward that used it). A conv weight
    [C_out, C_in, kh, kw] is the matrix [C_out, C_in·kh·kw] (brsf's offsets follow that order).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    w64 = _double(weight)
    if method == "backprop":
        return w64
    if method in ("fa", "kp", "wm", "frsf") and feedback is None:
        raise ValueError(f"method={method!r} needs its feedback tensor")
    if method != "frsf" and method not in SIGN_METHODS:
        return _double(feedback)
    sign = torch.sign(w64)
    if method == "frsf":
        return _double(feedback).abs() * sign
    scale = rule_scale(method, init, *fans(weight)) if scale is None else float(scale)
    if method == "usf":
        return scale * sign
    if seed is None or counter is None:
        raise ValueError("method='brsf' needs seed and counter")
    numel = weight.numel()
    offsets = _int(counter) * numel + torch.arange(numel, dtype=torch.int64, device=weight.device)
    uniform = philox_uniform(_int(seed), offsets).double().view(weight.shape)
    return scale * uniform * sign


def layer_feedback(layer: nn.Module, counter=None) -> torch.Tensor:
    """B in float64 for an FALinear or FAConv2d, from its method's equations and its stored state
    (weight, feedback, brsf's ``feedback_seed``; the scale from its ``init`` and the weight's
    fans, by formula). brsf: ``counter`` defaults to the layer's (after a training forward: the
    draw that forward used)."""
    method = layer.method
    if method == "brsf":
        seed, counter = layer.feedback_seed, layer.counter if counter is None else counter
    else:
        seed = None
    return oracle_feedback(method, layer.weight, layer.feedback, init=layer.init, seed=seed, counter=counter)


def layer_oracle(layer: nn.Module, x: torch.Tensor, grad_y: torch.Tensor, counter=None) -> dict:
    """:func:`oracle` of an FALinear (:func:`conv2d_oracle` of an FAConv2d with zero padding) with
    the B of :func:`layer_feedback` (call it after the layer's forward: brsf's draw)."""
    B = layer_feedback(layer, counter)
    if layer.weight.dim() == 2:
        return oracle(x, layer.weight, layer.bias, B, grad_y, layer.activation, layer.negative_slope)
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        raise ValueError("layer_oracle of an FAConv2d takes numeric zero padding; for others, pad x and call "
                         "conv2d_oracle")
    return conv2d_oracle(x, layer.weight, layer.bias, B, grad_y, layer.stride, layer.padding, layer.dilation,
                         layer.groups, layer.activation, layer.negative_slope)


# ------------------------------------------------------------------------ rounding bounds

def _activation_model(activation: str) -> ActivationErrorModel:
    if activation not in ACTIVATION_ERROR_MODELS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATION_ERROR_MODELS)}, got {activation!r}")
    return ACTIVATION_ERROR_MODELS[activation]


def _gamma(n: int, unit: float) -> float:
    return n * unit / (1 - n * unit) if n * unit < 1 else math.inf


class _Rounding:
    """The arithmetic of the bounds for one dtype (see the module docstring)."""

    def __init__(self, dtype: torch.dtype, tf32: bool = False, accumulate: torch.dtype | None = None):
        if dtype not in UNIT_ROUNDOFF:
            raise ValueError(f"dtype must be one of {tuple(UNIT_ROUNDOFF)}, got {dtype}")
        if accumulate is None:
            accumulate = torch.float64 if dtype == torch.float64 else torch.float32
        self.u = UNIT_ROUNDOFF[dtype]
        self.eta = SMALLEST_SUBNORMAL[dtype]
        self.a = FP32_ACCUMULATION_UNIT if accumulate == torch.float32 else UNIT_ROUNDOFF[accumulate]
        self.t = TF32_UNIT if tf32 else 0.0

    def round(self, value, error):
        """The error bound after rounding ``value`` (known within ``error``) to the dtype."""
        return error + self.u * (value.abs() + error) + self.eta / 2

    def dot(self, a, ea, b, eb, length: int):
        """The error bound of a @ b (rule 1), operands within ea, eb (tensors or None: exact)."""
        abs_a, abs_b = a.abs(), b.abs()
        wide_a = abs_a if ea is None else abs_a + ea
        wide_b = abs_b if eb is None else abs_b + eb
        factor = (1 + self.t) ** 2 * (1 + _gamma(length + 1, self.a)) - 1
        bound = factor * (wide_a @ wide_b)
        if ea is not None:
            bound = bound + ea @ wide_b
        if eb is not None:
            bound = bound + abs_a @ eb
        return bound

    def forward(self, h, eh, weight, bias, activation, slope):
        """(z, e_z, y, e_y) of z = h Wᵀ + b, y = f(z) (rules 1–3)."""
        model = _activation_model(activation)
        w = _double(weight)
        z = h @ w.t()
        ones = torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)
        if bias is not None:
            b = _double(bias)
            z = z + b
            e_dot = self.dot(torch.cat([h, ones], 1), None if eh is None else torch.cat([eh, 0 * ones], 1),
                             torch.cat([w, b[:, None]], 1).t(), None, w.shape[1])
            e_z = e_dot + _gamma(2, self.u) * (z.abs() + b.abs() + e_dot) + self.eta
        else:
            e_dot = self.dot(h, eh, w.t(), None, w.shape[1])
            e_z = e_dot + _gamma(2, self.u) * (z.abs() + e_dot) + self.eta
        y = activation_and_derivative(z, activation, slope)[0]
        lipschitz = max(1.0, abs(slope)) if activation == "leaky_relu" else model.lipschitz
        e_f = lipschitz * e_z + model.evaluation * self.a * (1 + z.abs() + y.abs())
        return z, e_z, y, self.round(y, e_f)

    def local_error(self, g, eg, z, ez, ey, activation, slope):
        """(δ, e_δ, kink) of δ = g ⊙ f'(z) (rules 2–4): g within eg (None: exact), z within ez,
        the saved y within ey."""
        model = _activation_model(activation)
        fprime = activation_and_derivative(z, activation, slope)[1]
        e_fprime = torch.maximum(model.curvature * ez, model.from_output * ey)
        e_fprime = e_fprime + model.evaluation * self.a * (1 + z.abs() + fprime.abs()) + model.derivative_ops * self.u
        delta = g * fprime
        e_delta = g.abs() * e_fprime
        if eg is not None:
            e_delta = e_delta + eg * (fprime.abs() + e_fprime)
        e_delta = self.round(delta, e_delta)
        kink = torch.zeros_like(z, dtype=torch.bool)
        if model.kinked:
            kink = z.abs() <= ez + self.eta
            jump = abs(1 - slope) if activation == "leaky_relu" else 1.0
            wide_g = g.abs() if eg is None else g.abs() + eg
            e_delta = e_delta + torch.where(kink, wide_g * jump * (1 + 2 * self.u), 0.0)
        return delta, e_delta, kink

    def column_sum(self, delta, e_delta):
        """The error bound of grad_b = Σ_rows δ (rule 6)."""
        rows = delta.shape[0]
        value = delta.sum(0)
        return self.round(value, _gamma(rows, self.a) * (delta.abs() + e_delta).sum(0) + e_delta.sum(0))


def layer_bounds(x, weight, bias, feedback, grad_y, activation="relu", negative_slope=0.01, *, dtype=None,
                 method="fa", tf32=False, accumulate=None) -> dict:
    """Elementwise error bounds of one FA layer computed in ``dtype`` (default x's), against
    :func:`oracle` on the same inputs (see the module docstring for the rules).

    ``feedback`` is B (:func:`oracle_feedback`); ``method`` says whether the code under test forms
    B itself from W's sign (usf, frsf, brsf: rounded, rule 5). ``tf32``: fp32 dots on tf32
    operands. ``accumulate``: the accumulator's dtype (default fp32, float64 for float64).

    Returns float64 tensors shaped as the outputs: "y", "grad_x", "grad_weight", "grad_bias"
    (None without a bias), "delta" (δ as the backward GEMMs use it, shaped as grad_y) and
    "kink" (bool: where relu-like f' may flip; zero grad_y there for tight bounds).
    """
    rounding = _Rounding(dtype or x.dtype, tf32, accumulate)
    x64, g64, B = _double(x), _double(grad_y), _double(feedback)
    x2d, g2d = _rows(x64), _rows(g64)
    z, e_z, y, e_y = rounding.forward(x2d, None, weight, bias, activation, negative_slope)
    delta, e_delta, kink = rounding.local_error(g2d, None, z, e_z, e_y, activation, negative_slope)
    e_B = _gamma(3, rounding.u) * B.abs() if method in SIGN_METHODS else None
    rows, k = x2d.shape
    grad_x = rounding.round(delta @ B, rounding.dot(delta, e_delta, B, e_B, B.shape[0]))
    grad_w = rounding.round(delta.t() @ x2d, rounding.dot(delta.t(), e_delta.t(), x2d, None, rows))
    lead, n_out = tuple(g64.shape[:-1]), B.shape[0]
    return {
        "y": e_y.reshape(*lead, n_out),
        "grad_x": grad_x.reshape(*lead, k),
        "grad_weight": grad_w,
        "grad_bias": rounding.column_sum(delta, e_delta) if bias is not None else None,
        "delta": e_delta.reshape(g64.shape),
        "kink": kink.reshape(*lead, n_out),
    }


def tf32_bounds(x, weight, bias, feedback, grad_y, activation="relu", negative_slope=0.01) -> dict:
    """:func:`layer_bounds` of an fp32 layer whose dots read tf32 operands (truncated to 10
    mantissa bits) and accumulate in fp32."""
    return layer_bounds(x, weight, bias, feedback, grad_y, activation, negative_slope, dtype=torch.float32,
                        tf32=True)


def local_error_bounds(grad_y, z, activation="relu", negative_slope=0.01, *, dtype, z_error=None) -> dict:
    """Bounds of a δ pass alone: δ = g ⊙ f'(z) and grad_b = Σ_rows δ computed in ``dtype`` from
    grad_y [M, N] and what the forward saved (y, z or f'(z), rounded once to ``dtype``) of z [M, N]
    (float64), z known within ``z_error`` (default 0: the saved tensor formed from this z).
    Returns {"delta", "grad_bias", "kink"}."""
    rounding = _Rounding(dtype)
    z = _double(z)
    ez = torch.zeros_like(z) if z_error is None else _double(z_error).expand_as(z)
    y = activation_and_derivative(z, activation, negative_slope)[0]
    model = _activation_model(activation)
    e_y = rounding.round(y, model.evaluation * rounding.a * (1 + z.abs() + y.abs()) + model.lipschitz * ez)
    delta, e_delta, kink = rounding.local_error(_double(grad_y), None, z, ez, e_y, activation, negative_slope)
    return {"delta": e_delta, "grad_bias": rounding.column_sum(delta, e_delta), "kink": kink}


def dfa_bounds(layers, feedback, x, error, *, dtype=None, tf32=False, accumulate=None) -> dict:
    """Elementwise error bounds of a DFA network (:func:`dfa_oracle`'s arguments and keys)
    computed in ``dtype`` (default x's): the rules of :func:`layer_bounds` through the chain —
    each hidden output, rounded, is the next layer's input; e B_l is a dot of length n_out,
    rounded to the dtype, and is δ_l's upstream gradient."""
    rounding = _Rounding(dtype or x.dtype, tf32, accumulate)
    parts, feedbacks = _dfa_parts(layers, feedback)
    h, e_h, saved = _double(x), None, []
    for weight, bias, activation, slope in parts:
        z, e_z, y, e_y = rounding.forward(h, e_h, weight, bias, activation, slope)
        saved.append((h, e_h, z, e_z, e_y))
        h, e_h = y, e_y
    e = _double(error)
    out = {"y": e_h}
    for index, ((_, bias, activation, slope), (h_in, e_in, z, e_z, e_y)) in enumerate(zip(parts, saved)):
        if index < len(feedbacks):
            B = feedbacks[index]
            projected = e @ B
            g, e_g = projected, rounding.round(projected, rounding.dot(e, None, B, None, B.shape[0]))
        else:
            g, e_g = e, None
        delta, e_delta, _ = rounding.local_error(g, e_g, z, e_z, e_y, activation, slope)
        out[f"layers.{index}.weight"] = rounding.round(delta.t() @ h_in,
                                                       rounding.dot(delta.t(), e_delta.t(), h_in, e_in, len(h_in)))
        out[f"layers.{index}.bias"] = rounding.column_sum(delta, e_delta) if bias is not None else None
    return out


# ------------------------------------------------------------------------ the assertion

def _index(flat: int, shape) -> tuple:
    index = []
    for size in reversed(shape):
        index.append(flat % size if size else 0)
        flat //= size if size else 1
    return tuple(reversed(index))


def _check_tensor(got, expected, dtype, bound, label) -> None:
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"{label}: expected a tensor, got {type(got).__name__}")
    if tuple(got.shape) != tuple(expected.shape):
        raise AssertionError(f"{label}: shape {tuple(got.shape)}, the oracle's is {tuple(expected.shape)}")
    if dtype is not None and got.dtype != dtype:
        raise AssertionError(f"{label}: dtype {got.dtype}, expected {dtype}")
    if expected.numel() == 0:
        return
    got64 = got.detach().double().to(expected.device)
    expected = expected.detach().double()
    finite = expected[torch.isfinite(expected)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    if bound is None:
        if (dtype or got.dtype) != torch.float64:
            raise ValueError(f"{label}: a {dtype or got.dtype} result needs elementwise bounds (bounds=layer_bounds("
                             "...) or a tensor): only float64 has a fixed bound")
        bound = torch.full_like(expected, FLOAT64_TOLERANCE * scale)
        policy = f"float64: {FLOAT64_TOLERANCE:g} x max(1, max|oracle|) = {FLOAT64_TOLERANCE * scale:.3g}"
    else:
        bound = torch.as_tensor(bound, dtype=torch.float64, device=expected.device)
        bound = bound.reshape(expected.shape) if bound.numel() == expected.numel() else bound.expand_as(expected)
        policy = "elementwise rounding bound" + (f" for {dtype}" if dtype is not None else "")
    same = (got64 == expected) | (got64.isnan() & expected.isnan())
    error = torch.where(same, 0.0, (got64 - expected).abs().nan_to_num(nan=math.inf))
    over = error > bound
    if not over.any():
        return
    ratio = torch.where(over, error / bound, 0.0).nan_to_num(nan=math.inf, posinf=math.inf)
    worst = int(ratio.flatten().argmax())
    index = _index(worst, expected.shape)
    times = ratio.flatten()[worst].item()
    raise AssertionError(
        f"{label}: {int(over.sum())} of {expected.numel()} elements exceed their bound ({policy})\n"
        f"worst at index {index}: got {got64.flatten()[worst].item():.10g}, oracle "
        f"{expected.flatten()[worst].item():.10g}, |error| {error.flatten()[worst].item():.3g} > bound "
        f"{bound.flatten()[worst].item():.3g} ({times:.3g}x the bound); max |oracle| {scale:.3g}"
    )


def assert_parity(result, expected, dtype: torch.dtype | None = None, *, bounds=None, name: str | None = None):
    """Assert that ``result`` matches the float64 oracle ``expected`` within the fixed bounds.

    ``result`` and ``expected``: tensors, or dicts (every key of ``expected`` is checked; a None
    there must be None in ``result``; extra keys of ``result`` are ignored). ``dtype``: the dtype
    the result must have (and whose policy applies). ``bounds``: elementwise bounds (a tensor, a
    number, or a dict of them, e.g. :func:`layer_bounds`); without them the float64 policy
    applies (|error| ≤ ``FLOAT64_TOLERANCE``·max(1, max|oracle|)), and any other dtype is an
    error. NaN must meet NaN, ±inf the same inf. The message names the tensor (``name``: what
    produced it), how many elements exceed their bound, the worst one (index, got, oracle, its
    bound), as ``torch.testing.assert_close`` does.
    """
    prefix = f"{name}: " if name else ""
    if isinstance(expected, Mapping):
        if not isinstance(result, Mapping):
            raise TypeError(f"{prefix}expected is a dict, result is a {type(result).__name__}")
        for key, want in expected.items():
            if key not in result:
                raise AssertionError(f"{prefix}{key}: missing from the result")
            if want is None:
                if result[key] is not None:
                    raise AssertionError(f"{prefix}{key}: expected None, got a tensor")
                continue
            bound = bounds[key] if isinstance(bounds, Mapping) else bounds
            _check_tensor(result[key], want, dtype, bound, f"{prefix}{key}")
        return
    _check_tensor(result, expected, dtype, bounds, name or "tensor")


# ------------------------------------------------------------------------ checks on B

def feedback_from_backward(layer: nn.Module) -> torch.Tensor:
    """B as an FALinear's or FAConv2d's backward really applies it, read back through that
    backward (not through the layer's own helpers): on a copy in eval mode (brsf: the current
    draw) with the identity activation, grad_x for one-hot upstream gradients is B's rows — for
    a conv, with stride, dilation 1 and no padding on a kh×kw input. Returns B in the weight's
    dtype and shape, exact (each element is one product with 1)."""
    probe = copy.deepcopy(layer).eval()
    probe.activation = "identity"
    weight = probe.weight
    rows = weight.shape[0]
    factory = dict(dtype=weight.dtype, device=weight.device)
    if weight.dim() == 2:
        x = torch.zeros(rows, weight.shape[1], **factory, requires_grad=True)
        probe(x).backward(torch.eye(rows, **factory))
        return x.grad
    probe.stride, probe.padding, probe.dilation, probe.padding_mode = (1, 1), (0, 0), (1, 1), "zeros"
    groups = probe.groups
    c_group, kernel = weight.shape[1], tuple(weight.shape[2:])
    x = torch.zeros(rows, c_group * groups, *kernel, **factory, requires_grad=True)
    probe(x).backward(torch.eye(rows, **factory).view(rows, rows, 1, 1))
    per_group = rows // groups
    return torch.stack([x.grad[n, (n // per_group) * c_group:(n // per_group + 1) * c_group] for n in range(rows)])


def _fail_where(bad: torch.Tensor, message: str, *tensors) -> None:
    if bad.any():
        flat = int(bad.flatten().nonzero()[0])
        index = _index(flat, bad.shape)
        values = ", ".join(f"{label} {t.flatten()[flat].item():.8g}" for label, t in tensors)
        raise AssertionError(f"{message}: {int(bad.sum())} of {bad.numel()} elements, first at {index} ({values})")


def assert_feedback_rule(B: torch.Tensor, method: str, weight: torch.Tensor, *, init: str = "kaiming",
                         feedback: torch.Tensor | None = None, name: str = "B") -> None:
    """Assert that B (e.g. from :func:`feedback_from_backward`) is what ``method`` allows, in
    magnitude and sign, to the rounding of B's dtype (u):

    - backprop: B = W; fa, kp, wm: B = ``feedback`` (if given), exactly;
    - sign rules: sign(B) = sign(W) wherever B ≠ 0, and B = 0 where W = 0;
    - usf: every |B| = s (:func:`rule_scale`) within 3u·s; frsf: |B| = |R| (``feedback``) within 3u·|R|;
    - brsf: every |B| ≤ b (within 3u·b), and the draws fill [0, b): max |B| ≥ b·(1 − 25/n) for
      n ≥ 50 elements (a draw of n uniforms falls short of that with probability < e⁻²⁵).
    """
    B64, w64 = _double(B), _double(weight)
    if B.shape != weight.shape:
        raise AssertionError(f"{name}: shape {tuple(B.shape)}, the weight's is {tuple(weight.shape)}")
    tol = 3 * UNIT_ROUNDOFF.get(B.dtype, 2.0**-53)
    if method == "backprop" or (method in ("fa", "kp", "wm") and feedback is not None):
        want = w64 if method == "backprop" else _double(feedback)
        _fail_where(B64 != want, f"{name}: method={method!r} feeds back through "
                    f"{'W' if method == 'backprop' else 'its feedback tensor'}, B differs", (name, B64), ("want", want))
        return
    if method not in SIGN_METHODS:
        return
    sign_w = torch.sign(w64)
    _fail_where((B64 != 0) & (torch.sign(B64) != sign_w), f"{name}: method={method!r}: sign(B) is not sign(W)",
                (name, B64), ("W", w64))
    _fail_where((w64 == 0) & (B64 != 0), f"{name}: method={method!r}: B must be 0 where W is", (name, B64))
    magnitude = B64.abs()
    if method == "usf":
        s = rule_scale("usf", init, *fans(weight))
        _fail_where((w64 != 0) & ((magnitude - s).abs() > tol * s), f"{name}: usf's |B| must be s = {s:.8g}",
                    (name, B64))
    elif method == "frsf":
        if feedback is None:
            raise ValueError("frsf: pass feedback (R) to check |B| = |R|")
        r = _double(feedback).abs()
        _fail_where((w64 != 0) & ((magnitude - r).abs() > tol * r), f"{name}: frsf's |B| must be |R|",
                    (name, B64), ("R", r))
    else:
        b = rule_scale("brsf", init, *fans(weight))
        _fail_where(magnitude > b * (1 + tol), f"{name}: brsf's |B| must be at most b = {b:.8g}", (name, B64))
        n = int((w64 != 0).sum())
        if n >= 50 and magnitude.max().item() < b * (1 - 25 / n):
            raise AssertionError(f"{name}: brsf's |B| must fill [0, b = {b:.8g}): max |B| is only "
                                 f"{magnitude.max().item():.8g} over {n} draws")


def assert_uses_feedback(grad_x, delta, feedback, weight, *, bound=None, name: str = "grad_x") -> None:
    """Assert that grad_x is δ·B and not backprop's δ·W: for every rule but backprop.

    ``delta`` δ [..., N] (:func:`local_error`), ``feedback`` B [N, K] (:func:`oracle_feedback`),
    ``weight`` W. ``bound``: grad_x's bound (default: the float64 policy). Fails with a message
    saying the error went through W when grad_x is δ·W; raises ValueError when δ·B and δ·W are
    too close for the check to tell them apart (choose other inputs).
    """
    d64, B64, w64 = _double(delta), _double(feedback), _double(weight)
    via_b, via_w = d64 @ B64, d64 @ w64
    if bound is None:
        bound = FLOAT64_TOLERANCE * max(1.0, via_b.abs().max().item() if via_b.numel() else 1.0)
    bound = torch.as_tensor(bound, dtype=torch.float64, device=via_b.device).expand_as(via_b)
    gap = (via_b - via_w).abs()
    if via_b.numel() == 0 or not (gap > 100 * bound).any():
        raise ValueError(f"{name}: δ·B and δ·W differ by at most {gap.max().item() if gap.numel() else 0:.3g}, "
                         "within 100x the bound: these inputs cannot tell FA from backprop")
    got = grad_x.detach().double().to(via_b.device)
    if not ((got - via_w).abs() > bound).any():
        raise AssertionError(f"{name} is δ·W, backprop's, not δ·B: the error was sent back through the weight "
                             "instead of the feedback matrix")
    assert_parity(grad_x, via_b, bounds=bound, name=f"{name} (δ·B)")


# ------------------------------------------------------------------------ gradcheck

_RULE_KWARGS = ("method", "feedback_scale", "seed", "counter")


def gradcheck_fa(layer_or_fn: nn.Module | Callable, x: torch.Tensor, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, *, as_backprop: bool = True, feedback: torch.Tensor | None = None,
                 args: tuple = (), kwargs: dict | None = None, **gradcheck_kwargs) -> bool:
    """``torch.autograd.gradcheck`` of an FA layer in float64, where its gradient is the true one.

    FA's grad_x = δ B is not the derivative of y unless B = W, so this runs gradcheck on a
    float64 copy whose backward is backprop's: a module (FALinear, FAConv2d, a model of them) with
    every FA layer in ``backward_as_backprop`` (DFA models through their ``plain_forward``),
    checked with respect to x and its parameters (not a feedback Parameter: y does not depend on
    B); a function with ``fa_linear``'s signature ``fn(x, weight, bias, feedback, *args,
    **kwargs)`` called with feedback = weight — the same tensor, so that B follows W's
    perturbations — and without the rule's keyword arguments (method, feedback_scale, seed,
    counter). Layers with ``backend="triton"`` run on the reference (``"torch"``): the kernels
    have no float64. This checks the forward and the local gradients (f', grad_W, grad_b)
    against finite differences.

    With ``as_backprop=False`` the layer's own B is kept (a function gets ``feedback``): then
    gradcheck **must fail** for every rule but backprop — a random B does not give the
    derivative — which is a check that B is used at all. Returns True or raises
    ``torch.autograd.gradcheck.GradcheckError`` (``raise_exception=False``: returns False).
    """
    kwargs = dict(kwargs or {})
    if isinstance(layer_or_fn, nn.Module):
        module = copy.deepcopy(layer_or_fn).double()
        for sub in module.modules():  # float64 runs on PyTorch's reference: the kernels have no float64
            if getattr(sub, "backend", None) == "triton":
                sub.backend = "torch"
        plain = as_backprop and hasattr(module, "plain_forward")
        wrapper = _PlainForward(module) if plain else module
        names = [n for n, p in wrapper.named_parameters() if p.requires_grad and n.split(".")[-1] != "feedback"]
        state = dict(wrapper.named_parameters())
        params = [state[n].detach().clone().requires_grad_(True) for n in names]
        x64 = x.detach().double().requires_grad_(True)
        with contextlib.ExitStack() as stack:
            if as_backprop:
                for sub in module.modules():
                    if hasattr(sub, "backward_as_backprop"):
                        stack.enter_context(sub.backward_as_backprop())

            def run(x_in, *tensors):
                return torch.func.functional_call(wrapper, dict(zip(names, tensors)), (x_in,))

            return torch.autograd.gradcheck(run, (x64, *params), **gradcheck_kwargs)
    if weight is None:
        raise ValueError("gradcheck_fa of a function needs weight (and bias or None)")
    if as_backprop:
        for key in _RULE_KWARGS:
            kwargs.pop(key, None)
    elif feedback is None:
        raise ValueError("as_backprop=False needs feedback (the function's own B)")
    x64 = x.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    tensors = [x64, w64] + ([bias.detach().double().requires_grad_(True)] if bias is not None else [])
    b_fixed = None if as_backprop else feedback.detach().double()

    def run_fn(x_in, w_in, *rest):
        b_in = rest[0] if rest else None
        return layer_or_fn(x_in, w_in, b_in, w_in if as_backprop else b_fixed, *args, **kwargs)

    return torch.autograd.gradcheck(run_fn, tuple(tensors), **gradcheck_kwargs)


class _PlainForward(nn.Module):
    """A DFA model's ``plain_forward`` (ordinary autograd through every layer) as a module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.plain_forward(x)
