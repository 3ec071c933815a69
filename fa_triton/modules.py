"""``FALinear``: a drop-in ``nn.Linear`` (+ activation) trained by feedback alignment."""

from __future__ import annotations

import math

import torch
from torch import nn

from .activations import check_activation
from .backend import check_backend
from .functional import apply_checked, autocast_inputs
from .validation import check_inputs, inputs_fit


def _check_features(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


class FALinear(nn.Module):
    """``y = f(x Wᵀ + b)`` whose backward pass uses a fixed random ``feedback`` B instead of Wᵀ.

    Shapes: input [..., in_features] -> output [..., out_features].
    ``weight`` [out, in] and ``bias`` [out] are Parameters initialised exactly as in
    ``nn.Linear`` (with the same seed, the same values). ``feedback`` [out, in] is a
    persistent buffer drawn independently from the same distribution as ``weight``:
    saved in ``state_dict``, moved and cast by ``.to()``, never seen by an optimizer.
    """

    __constants__ = ["in_features", "out_features"]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "relu",
        *,
        negative_slope: float = 0.01,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_features("in_features", in_features)
        _check_features("out_features", out_features)
        check_activation(activation, negative_slope)
        check_backend(backend)
        self.in_features = in_features
        self.out_features = out_features
        self._activation = activation
        self._negative_slope = float(negative_slope)
        self._backend = backend
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("feedback", torch.empty((out_features, in_features), **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation for weight and bias (same RNG draws, same order), then feedback."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_feedback()

    @torch.no_grad()
    def reset_feedback(self, generator: torch.Generator | None = None) -> None:
        """Draw a new feedback matrix from weight's initial distribution, U(±1/√in_features)."""
        bound = 1 / math.sqrt(self.in_features)
        self.feedback.uniform_(-bound, bound, generator=generator)

    # activation, negative_slope and backend are checked when set, so forward need not.
    @property
    def activation(self) -> str:
        return self._activation

    @activation.setter
    def activation(self, value: str) -> None:
        check_activation(value, self._negative_slope)
        self._activation = value

    @property
    def negative_slope(self) -> float:
        return self._negative_slope

    @negative_slope.setter
    def negative_slope(self, value: float) -> None:
        check_activation(self._activation, value)
        self._negative_slope = float(value)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        check_backend(value)
        self._backend = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight, bias, feedback = autocast_inputs(x, self.weight, self.bias, self.feedback)
        if not inputs_fit(x, weight, bias, feedback):
            check_inputs(x, weight, bias, feedback, self._activation, self._negative_slope)  # says what is wrong
        return apply_checked(x, weight, bias, feedback, self._activation, self._negative_slope, self._backend)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        activation: str = "relu",
        feedback: torch.Tensor | None = None,
        *,
        negative_slope: float = 0.01,
        backend: str = "auto",
    ) -> "FALinear":
        """An FALinear with a copy of ``linear``'s weight and bias (same device and dtype).

        ``feedback`` [out, in] is copied if given, else drawn fresh.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, activation=activation,
            negative_slope=negative_slope, backend=backend, device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
            if feedback is not None:
                if not isinstance(feedback, torch.Tensor):
                    raise TypeError(f"feedback must be a torch.Tensor or None, got {type(feedback).__name__}")
                if feedback.shape != weight.shape:
                    raise ValueError(
                        f"feedback must have the shape of linear.weight {tuple(weight.shape)}, "
                        f"got feedback of shape {tuple(feedback.shape)}"
                    )
                layer.feedback.copy_(feedback)
        return layer

    def extra_repr(self) -> str:
        activation = self.activation
        if activation == "leaky_relu":
            activation = f"leaky_relu(negative_slope={self.negative_slope})"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"activation={activation}, backend={self.backend}"
        )
