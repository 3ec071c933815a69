"""``FAConv2d``: a drop-in ``nn.Conv2d`` (+ activation) trained by any rule of the FA family.

The backward (``fa_triton.ops.conv.FAConv2dFunction``) sends δ = g ⊙ f'(z) through B (the
feedback, of the weight's shape) instead of W. B is formed by the layer's ``method`` as for
``FALinear`` (``fa_triton.rules.methods``). Its convolutions are PyTorch's (cuDNN on a GPU):
``backend`` takes "auto" and "torch", which both run them; "triton" is refused (no kernels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.autograd import autocast_inputs, transformable
from ..ops.backends import check_backend
from ..ops.conv import FAConv2dFunction
from ..ops.validation import check_dtype, check_generator, check_int, check_number, check_pair
from ..rules.activations import apply_activation, check_activation
from ..rules.methods import check_method
from .state import FeedbackState, FusedActivation

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
CONV_BACKENDS = ("auto", "torch")


def _check_conv_backend(backend: str) -> None:
    # One meaning of backend= for every layer: "triton" asks for kernels FAConv2d does not have.
    check_backend(backend, CONV_BACKENDS, "FAConv2d's backend (it has no Triton kernels: its convolutions run on "
                                          "PyTorch's ops, cuDNN on a GPU)")


class FAConv2d(FeedbackState, FusedActivation, nn.Module):
    """``y = f(conv2d(x, W) + b)`` whose backward sends the error through B instead of W.

    nn.Conv2d's signature, defaults and init (``in_channels, out_channels, kernel_size,
    stride=1, padding=0, dilation=1, groups=1, bias=True, padding_mode="zeros"``; padding also
    "same" and "valid"), plus ``activation`` (default "identity": a plain convolution, as a
    convolution is usually followed by a normalization before its activation; "relu" etc. fuse
    the activation, as FALinear's), ``negative_slope``, ``method`` and ``init``
    (the FA family, as FALinear's: ``fa_triton.methods``), ``backend`` ("auto" or "torch").
    Input [N, C_in, H, W] or [C_in, H, W] -> output [N, C_out, H_out, W_out] or [C_out, H_out, W_out].
    The fan-in and fan-out of init and usf's scale are the conv weight's (as ``nn.init``'s).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        activation: str = "identity",
        *,
        negative_slope: float = 0.01,
        method: str = "fa",
        init: str = "kaiming",
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by "
                             f"groups ({groups})")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        _check_conv_backend(backend)
        check_method(method, init)
        check_dtype(dtype)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = check_pair("kernel_size", kernel_size, 1)
        self.stride, self.dilation = check_pair("stride", stride, 1), check_pair("dilation", dilation, 1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
            if padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError("padding='same' is not supported for strided convolutions (as nn.Conv2d)")
        else:
            padding = check_pair("padding", padding, 0)
        self.padding, self.padding_mode = padding, padding_mode
        self._set_activation(activation, negative_slope)
        self._backend = backend
        factory = {"device": device, "dtype": dtype}
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self._register_feedback(method, init, shape, factory)
        self.reset_parameters()

    @property
    def fans(self) -> tuple[int, int]:
        """(fan_in, fan_out) of the weight, as ``nn.init`` computes them."""
        receptive = self.kernel_size[0] * self.kernel_size[1]
        return self.in_channels // self.groups * receptive, self.out_channels * receptive

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        _check_conv_backend(value)
        self._backend = value

    @torch.no_grad()
    def mirror(self, batch_size: int = 128, eta: float = 0.01, noise_amplitude: float = 0.1, size: int = 8,
               generator: torch.Generator | None = None, activation: str | None = None) -> None:
        """One weight-mirroring step (method "wm"), the conv form of ``FALinear.mirror``: noise
        images x ~ U(±noise_amplitude/2) [batch, C_in, size, size], y = f(conv(x)), B += eta ·
        the correlation of y with x (the weight gradient's form: conv2d_weight(x, y))."""
        if self.method != "wm":
            raise ValueError(f"mirror() is the weight-mirroring step of method='wm', this layer's is {self.method!r}")
        check_int("batch_size", batch_size)
        check_int("size", size)
        check_number("eta", eta)
        check_number("noise_amplitude", noise_amplitude, minimum=0)
        check_generator(generator)
        activation = self.activation if activation is None else activation
        check_activation(activation, self.negative_slope)
        x = (torch.rand(batch_size, self.in_channels, size, size, generator=generator, device=self.weight.device,
                        dtype=self.weight.dtype) - 0.5) * noise_amplitude
        x, padding = self._pad(x)
        y = apply_activation(F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups),
                             activation, self.negative_slope)
        self.feedback.add_(torch.nn.grad.conv2d_weight(x, self.weight.shape, y, self.stride, padding, self.dilation,
                                                       self.groups), alpha=eta)

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """x padded explicitly unless the padding is symmetric zeros, and the conv's own padding."""
        if self.padding == "valid":
            return x, (0, 0)
        if self.padding == "same":
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            pads = [(t // 2, t - t // 2) for t in total]
        else:
            pads = [(p, p) for p in self.padding]
        if self.padding_mode == "zeros" and all(left == right for left, right in pads):
            return x, (pads[0][0], pads[1][0])
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]), mode=mode), (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
            raise ValueError(f"FAConv2d expects input [N, C, H, W] or [C, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x must have {self.in_channels} channels (dim 1) to match the weight "
                             f"{tuple(self.weight.shape)}, got x of shape {tuple(x.shape)}")
        x, weight, bias, feedback = autocast_inputs(x, self.weight, self.bias, self.feedback)  # as nn.Conv2d's casts
        if x.dtype != weight.dtype or x.device != weight.device:
            raise TypeError(f"x is {x.dtype} on {x.device} but the weight is {weight.dtype} on {weight.device}: "
                            "cast the module with .to(), or the input")
        if feedback is not None and feedback.dtype != weight.dtype:
            feedback = feedback.to(weight.dtype)
        counter = self._draw()  # brsf: a new R for each training step
        x, padding = self._pad(x)
        if torch._C._are_functorch_transforms_active():  # vmap, grad: aten ops (no vmap rule on the Function)
            def conv(x, weight, bias):
                return F.conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups)
            y = transformable(conv, x, weight, bias, feedback, counter, self.activation, self.negative_slope,
                              self.rule)
        else:
            y = FAConv2dFunction.apply(x, weight, bias, feedback, counter, self.stride, padding, self.dilation,
                                       self.groups, self.activation, self.negative_slope, self.rule)
        return y.squeeze(0) if unbatched else y

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, activation: str = "identity", *, negative_slope: float = 0.01,
                  method: str = "fa", init: str = "kaiming", backend: str = "auto") -> "FAConv2d":
        """An FAConv2d with a copy of ``conv``'s weight and bias (same device, dtype, geometry)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode, activation, negative_slope=negative_slope,
                    method=method, init=init, backend=backend, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode}"
        if self.activation != "identity":
            text += f", activation={self.activation}"
        return text + f", method={self.method_text()}" + (f", init={self.init}" if self.init != "kaiming" else "")
