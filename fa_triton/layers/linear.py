"""``FALinear``: a drop-in ``nn.Linear`` (+ activation) trained by feedback alignment."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.autograd import apply_checked, autocast_inputs, eager_runner
from ..ops.backends import check_backend, resolve
from ..ops.validation import check_dtype, check_generator, check_inputs, check_int, check_number
from ..rules.activations import apply_activation, check_activation
from ..rules.methods import check_method
from .state import FeedbackState, FusedActivation

_MISSING = object()
_any_autocast = torch._C._is_any_autocast_enabled
_transforms_active = torch._C._are_functorch_transforms_active


class FALinear(FeedbackState, FusedActivation, nn.Module):
    """``y = f(x Wᵀ + b)`` whose backward pass sends the error through B instead of Wᵀ.

    Shapes: input [..., in_features] -> output [..., out_features]. ``weight`` [out, in] and
    ``bias`` [out] are Parameters. ``method`` (``fa_triton.METHODS``, see ``fa_triton.methods``)
    chooses B:

    - ``"fa"`` (default): ``feedback`` [out, in], a persistent buffer drawn independently from
      the init's distribution: saved in ``state_dict``, moved and cast by ``.to()``, never seen
      by an optimizer.
    - ``"backprop"``: B = W (no feedback is stored).
    - ``"usf"``: B = s·sign(W) with s the init's standard deviation (nothing stored: the kernel
      forms B from W).
    - ``"frsf"``: B = |R|·sign(W); ``feedback`` holds R (a fixed buffer).
    - ``"brsf"``: B = |R|·sign(W) with R ~ the init's U(-b, b) redrawn at every training forward
      (``self.training`` and grad enabled) from a seed (buffer ``feedback_seed``) and a draw
      counter (buffer ``counter``, advanced on the device, so CUDA-graph replays redraw).
    - ``"kp"``: ``feedback`` is a **Parameter** (for this method only) whose gradient is W's:
      in W's parameter group it gets W's updates and weight decay (Kolen–Pollack).
    - ``"wm"``: ``feedback`` is a buffer that :meth:`mirror` moves towards W (weight mirroring).

    ``init``: ``"kaiming"`` (default: nn.Linear's, the same values for the same seed; B from
    U(±1/√in)) or ``"xavier"`` (W and B xavier-uniform, bias 0; as BioTorch).

    ``activation`` defaults to "relu": a fused activation is what the layer is for (the
    founding tutorial's hidden layers; pass "identity" for an output layer). FAConv2d defaults
    to "identity" instead, as a convolution is usually followed by a normalization before its
    activation.
    """

    __constants__ = ["in_features", "out_features"]
    _fit = None  # forward's fast path (see _current_fit); a class default for layers pickled before it

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "relu",
        *,
        negative_slope: float = 0.01,
        backend: str = "auto",
        method: str = "fa",
        init: str = "kaiming",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_int("in_features", in_features)
        check_int("out_features", out_features)
        check_dtype(dtype)
        check_backend(backend)
        check_method(method, init)
        self.in_features = in_features
        self.out_features = out_features
        self._set_activation(activation, negative_slope)
        self._backend = backend
        self._fit = None  # the last checked call's tensors and Function (forward's fast path)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self._register_feedback(method, init, (out_features, in_features), factory)
        self.reset_parameters()

    @property
    def fans(self) -> tuple[int, int]:
        """(fan_in, fan_out) of the weight: (in_features, out_features)."""
        return self.in_features, self.out_features

    @torch.no_grad()
    def mirror(self, batch_size: int = 128, eta: float = 0.01, noise_amplitude: float = 0.1,
               generator: torch.Generator | None = None, activation: str | None = None) -> None:
        """One weight-mirroring step (method ``"wm"``; Akrout et al. 2019, their defaults): on
        noise inputs x ~ U(±noise_amplitude / 2) [batch_size, in], with the layer's response
        y = f(x Wᵀ + b) [batch_size, out] (f: ``activation``, default the layer's own),
        B += eta · yᵀ x (summed over the batch), which drives B towards W."""
        if self.method != "wm":
            raise ValueError(f"mirror() is the weight-mirroring step of method='wm', this layer's is {self.method!r}")
        check_int("batch_size", batch_size)
        check_number("eta", eta)
        check_number("noise_amplitude", noise_amplitude, minimum=0)
        check_generator(generator)
        activation = self._activation if activation is None else activation
        check_activation(activation, self._negative_slope)
        x = (torch.rand(batch_size, self.in_features, generator=generator, device=self.weight.device,
                        dtype=self.weight.dtype) - 0.5) * noise_amplitude
        y = apply_activation(torch.nn.functional.linear(x, self.weight, self.bias), activation, self._negative_slope)
        self.feedback.add_(y.t() @ x, alpha=eta)

    # activation, negative_slope and backend are checked when set, so forward need not.
    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        check_backend(value)
        self._backend, self._fit = value, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The fast path, for a call like the last checked one (see _current_fit): an x of the
        # same dtype, width and device, in plain eager mode. It skips the argument checks and
        # the backend's resolution, which cost as much as the rest of the layer's Python.
        # Anything else (a first call, new or moved tensors, parametrizations, autocast,
        # torch.compile, torch.func) takes _checked_forward, which checks everything and
        # records the fit.
        if not torch.compiler.is_compiling():
            fit = self._current_fit()
            if (fit is not None and type(x) is torch.Tensor and x.dtype is fit[4] and x.dim() != 0
                    and x.shape[-1] == fit[5] and x.device == fit[6] and not _any_autocast()
                    and not _transforms_active()):
                weight, bias, feedback, _, _, _, _, rule, run, call = fit
                return run(x, weight, bias, feedback, self._draw() if rule.draws else None, call)
        return self._checked_forward(x)

    def _checked_forward(self, x: torch.Tensor) -> torch.Tensor:
        counter = self._draw()  # brsf: a new R for each training step
        x, weight, bias, feedback = autocast_inputs(x, self.weight, self.bias, self.feedback)
        # feedback is None for backprop (B = W), usf and brsf (B from W's sign).
        check_inputs(x, weight, bias, feedback, self._activation, self._negative_slope,
                     needs_feedback=feedback is not None)
        if not torch.compiler.is_compiling():  # traced, the assignment would be a side effect of every call
            self._fit = None
            if type(x) is torch.Tensor and not _any_autocast() and not _transforms_active():
                self._record_fit(weight, bias, feedback)
        return apply_checked(x, weight, bias, feedback, counter, self._activation, self._negative_slope, self.rule,
                             self._backend)

    def _record_fit(self, weight, bias, feedback) -> None:
        """Remember a checked call for the fast path: weight, bias and feedback (checked to fit
        together, and to fit the input: its dtype, width and device are the weight's), where
        each was found, the rule, and what runs the layer for them with its activation
        (``eager_runner``). Nothing is recorded for tensors not held in the module's own dicts (a
        parametrization computes them at every call)."""
        parameters = self._parameters
        holder = next((d for d in (parameters, self._buffers, self.__dict__)
                       if d.get("feedback", _MISSING) is feedback), None)
        if holder is None or parameters.get("weight") is not weight or parameters.get("bias", _MISSING) is not bias:
            return
        rule = self.rule
        # resolve raises if the backend cannot run there
        run, call = eager_runner(resolve(self._backend, weight), rule, self._activation, self._negative_slope)
        self._fit = (weight, bias, feedback, holder, weight.dtype, weight.shape[1], weight.device, rule, run, call)

    def _current_fit(self) -> tuple | None:
        """The recorded fit, if the layer still holds the same weight, bias and feedback objects
        (read from the dicts where they were found: nn.Module's __getattr__ costs more than the
        rest of this check) and the same rule (``_rule``, cleared when the method or the seed
        changes); else None. Moves and casts clear it (_apply)."""
        fit = self._fit
        if fit is not None:
            parameters = self._parameters
            weight = fit[0]
            if (parameters.get("weight") is weight and parameters.get("bias", _MISSING) is fit[1]
                    and fit[3].get("feedback", _MISSING) is fit[2] and self._rule is fit[7]
                    and weight.dtype is fit[4] and weight.shape[1] == fit[5]):  # not changed through .data
                return fit
        return None

    def __getstate__(self):
        # A copy or pickle records its own call: the fit holds this layer's tensors and, on Triton
        # and "auto", its steps' launch plans and choices, valid only in this process.
        return {**super().__getstate__(), "_fit": None}

    def _set_activation(self, activation: str, negative_slope: float) -> None:
        super()._set_activation(activation, negative_slope)
        self._fit = None  # the recorded call binds the activation

    def _load_from_state_dict(self, *args, **kwargs):
        self._fit = None  # assign=True with swap_tensors changes tensors in place, the objects kept
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._fit = None  # .to(), .cuda(), .half() may change the tensors in place
        return super()._apply(fn, recurse)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        activation: str = "relu",
        feedback: torch.Tensor | None = None,
        *,
        negative_slope: float = 0.01,
        backend: str = "auto",
        method: str = "fa",
        init: str = "kaiming",
    ) -> "FALinear":
        """An FALinear with a copy of ``linear``'s weight and bias (same device and dtype).

        ``feedback`` [out, in] (B, or R for frsf) is copied if given, else drawn from ``init``'s
        distribution; methods without a feedback tensor take none.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, activation=activation,
            negative_slope=negative_slope, backend=backend, method=method, init=init, device=weight.device,
            dtype=weight.dtype,
        )
        if feedback is not None and layer.feedback is None:
            raise ValueError(f"method={method!r} stores no feedback tensor: feedback must be None")
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
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"activation={activation}, method={self.method_text()}, backend={self.backend}"
        )
        return text + (f", init={self.init}" if self.init != "kaiming" else "")
