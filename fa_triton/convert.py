"""Turn an ``nn.Linear``/``nn.Conv2d`` model into a feedback-alignment model, and load its checkpoints.

:func:`convert` replaces ``nn.Linear`` layers by :class:`~fa_triton.FALinear` and ``nn.Conv2d``
layers by :class:`~fa_triton.FAConv2d` (same weight and
bias Parameters, fresh feedback), fusing a directly following activation module of an
``nn.Sequential`` into the layer. :func:`load_linear_state_dict` loads a checkpoint of the
original model into the converted one.

State-dict keys: a fused activation module is replaced by :class:`Fused` (an ``nn.Identity``
that prints what it was) in its slot (not removed), so every index of an ``nn.Sequential`` and
every key of the original model stays as it was; a converted layer only adds ``<name>.feedback``.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .layers.conv import FAConv2d
from .layers.dfa_model import DFAModel
from .layers.dfa_network import DFANetwork
from .layers.linear import FALinear
from .layers.sequential import FASequential
from .ops.backends import check_backend
from .rules.methods import INITS, check_method

__all__ = ["ConvertedLayer", "ConversionSummary", "Fused", "convert", "load_linear_state_dict"]

_DEFAULT_SLOPE = 0.01


def fusable_activation(module: nn.Module) -> tuple[str, float] | None:
    """(activation, negative_slope) of FALinear equivalent to ``module``, or None if it has none.

    Exact types only: a subclass may compute something else in its forward.
    """
    kind = type(module)
    if kind is nn.ReLU:
        return "relu", _DEFAULT_SLOPE
    if kind is nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    if kind is nn.Tanh:
        return "tanh", _DEFAULT_SLOPE
    if kind is nn.Sigmoid:
        return "sigmoid", _DEFAULT_SLOPE
    if kind is nn.GELU and module.approximate == "none":
        return "gelu", _DEFAULT_SLOPE
    if kind is nn.Identity:
        return "identity", _DEFAULT_SLOPE
    return None


class Fused(nn.Identity):
    """The slot of an activation module fused into the layer before it: passes its input
    through unchanged (an ``nn.Identity``) and prints as ``Fused(relu into 0)``."""

    def __init__(self, activation: str = "identity", into: str = "") -> None:
        super().__init__()
        self.activation, self.into = activation, into

    def extra_repr(self) -> str:
        return f"{self.activation} into {self.into}" if self.into else self.activation


@dataclass(frozen=True)
class ConvertedLayer:
    """One ``nn.Linear`` that became an FALinear (or ``nn.Conv2d`` an FAConv2d)."""

    name: str  # qualified name of the layer (unchanged by the conversion)
    activation: str  # the new layer's activation ("identity" unless an activation was fused)
    fused: str | None = None  # qualified name of the fused activation module, now Fused
    kind: str = "FALinear"  # the new layer's class


@dataclass
class ConversionSummary:
    """What :func:`convert` did: converted layers, and the ``nn.Linear`` layers kept with the reason."""

    converted: list[ConvertedLayer] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)

    @property
    def names(self) -> list[str]:
        """Qualified names of the converted layers."""
        return [layer.name for layer in self.converted]

    def __str__(self) -> str:
        convs = sum(layer.kind == "FAConv2d" for layer in self.converted)
        counts = f"{len(self.converted) - convs} nn.Linear -> FALinear" + (
            f", {convs} nn.Conv2d -> FAConv2d" if convs else "")
        lines = [f"fa_triton.convert: {counts}, {len(self.kept)} kept"]
        for layer in self.converted:
            fused = f" (fused {layer.fused}, now Fused)" if layer.fused is not None else ""
            lines.append(f"  {layer.name or '<root>'}: {layer.kind}, activation={layer.activation}{fused}")
        for name, reason in self.kept:
            lines.append(f"  {name or '<root>'}: kept ({reason})")
        return "\n".join(lines)


def _kind(module: nn.Module) -> str:
    return "FAConv2d" if isinstance(module, nn.Conv2d) else "FALinear"


def _selector(spec, argument: str) -> tuple[list[str], list[type]]:
    """Split ``include``/``exclude`` into name patterns and module types."""
    if spec is None:
        return [], []
    if isinstance(spec, (str, type)):
        spec = [spec]
    if not isinstance(spec, Iterable):
        raise TypeError(f"{argument} must be a name, a module type or a list of them, got {type(spec).__name__}")
    names, types = [], []
    for item in spec:
        if isinstance(item, str):
            names.append(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        else:
            raise TypeError(f"{argument} entries must be module names (str) or nn.Module types, got {item!r}")
    return names, types


def _matches(names, types, path: list[tuple[str, nn.Module]]) -> bool:
    """Whether the module at the end of ``path`` (root first) or a module containing it is selected."""
    for name, module in path:
        if name and any(fnmatch.fnmatchcase(name, pattern) for pattern in names):  # the root has no name
            return True
        if types and isinstance(module, tuple(types)):
            return True
    return False


def _unconvertible(linear: nn.Linear | nn.Conv2d, parent: nn.Module | None) -> str | None:
    """Why ``linear`` (an nn.Linear or nn.Conv2d) cannot be replaced, or None."""
    if isinstance(parent, nn.MultiheadAttention):
        return "inside nn.MultiheadAttention, which reads its weights without calling it"
    base = nn.Conv2d if isinstance(linear, nn.Conv2d) else nn.Linear
    if type(linear).forward is not base.forward:
        return f"{type(linear).__name__} overrides {base.__name__}.forward"
    if isinstance(linear.weight, nn.parameter.UninitializedParameter):
        return "uninitialized lazy layer: run one forward pass first"
    if parametrize.is_parametrized(linear):
        return "parametrized weight"
    return None


class _Converter:
    def __init__(self, activation_fusion, backend, include, exclude, method="fa", init="kaiming", chains=True):
        self.activation_fusion = activation_fusion
        self.chains = chains
        self.backend = backend
        self.method = method
        self.init = init
        self.include_names, self.include_types = include
        self.exclude_names, self.exclude_types = exclude
        self.include = bool(self.include_names or self.include_types)
        self.summary = ConversionSummary()
        self.seen_names: list[str] = []
        # A Linear shared by several parents becomes one FALinear (or, fused differently,
        # FALinears sharing its Parameters and one feedback): weight tying survives.
        self.done: dict[int, dict[tuple[str, float], FALinear]] = {}

    def selected(self, path) -> bool:
        if self.include and not _matches(self.include_names, self.include_types, path):
            return False
        return not _matches(self.exclude_names, self.exclude_types, path)

    def falinear(self, linear: nn.Linear | nn.Conv2d, activation: str, negative_slope: float):
        variants = self.done.setdefault(id(linear), {})
        if (activation, negative_slope) in variants:
            return variants[(activation, negative_slope)]
        # Built on the meta device: weight and bias are linear's own Parameters, so only
        # the feedback is drawn (no wasted initialisation, no extra RNG draws).
        if isinstance(linear, nn.Conv2d):
            if self.backend == "triton":  # honoured or refused, never quietly changed
                raise ValueError(
                    f"backend='triton', but the model has an nn.Conv2d ({linear}), and FAConv2d has no Triton kernels "
                    "(its convolutions run on PyTorch's ops, cuDNN on a GPU): convert with backend='auto' (the "
                    "kernels for the linear layers where they are faster) or exclude the convolutions "
                    "(exclude=nn.Conv2d)")
            layer = FAConv2d(
                linear.in_channels, linear.out_channels, linear.kernel_size, linear.stride, linear.padding,
                linear.dilation, linear.groups, linear.bias is not None, linear.padding_mode, activation,
                negative_slope=negative_slope, method=self.method, init=self.init, backend=self.backend, device="meta",
            )
        else:
            layer = FALinear(
                linear.in_features, linear.out_features, bias=linear.bias is not None, activation=activation,
                negative_slope=negative_slope, backend=self.backend, method=self.method, init=self.init,
                device="meta",
            )
        layer.weight = linear.weight
        layer.bias = linear.bias
        weight = linear.weight
        if variants:  # one Linear fused two ways: the layers share its feedback state
            layer.share_feedback_state(next(iter(variants.values())))
        else:
            layer.materialize_feedback(weight)
        layer.train(linear.training)
        variants[(activation, negative_slope)] = layer
        return layer

    def convert_root(self, model: nn.Linear | nn.Conv2d) -> nn.Module:
        path = [("", model)]
        reason = _unconvertible(model, None) or (None if self.selected(path) else "not selected by include/exclude")
        if reason is not None:
            self.summary.kept.append(("", reason))
            return model
        self.summary.converted.append(ConvertedLayer("", "identity", kind=_kind(model)))
        return self.falinear(model, "identity", _DEFAULT_SLOPE)

    def visit(self, module: nn.Module, path: list[tuple[str, nn.Module]]) -> None:
        slots = [(name, child) for name, child in module._modules.items() if child is not None]
        prefix = path[-1][0]
        for index, (name, child) in enumerate(slots):
            qualified = f"{prefix}.{name}" if prefix else name
            self.seen_names.append(qualified)
            child_path = path + [(qualified, child)]
            if not isinstance(child, (nn.Linear, nn.Conv2d)):
                self.visit(child, child_path)
                if self.chains:
                    as_chain(child)
                continue
            reason = _unconvertible(child, module)
            if reason is None and not self.selected(child_path):
                reason = "not selected by include/exclude"
            if reason is not None:
                self.summary.kept.append((qualified, reason))
                continue
            activation, negative_slope, fused = "identity", _DEFAULT_SLOPE, None
            if self.activation_fusion and isinstance(module, nn.Sequential) and index + 1 < len(slots):
                next_name, next_child = slots[index + 1]
                next_qualified = f"{prefix}.{next_name}" if prefix else next_name
                found = fusable_activation(next_child)
                if found is not None and not _matches(self.exclude_names, self.exclude_types,
                                                      [(next_qualified, next_child)]):
                    activation, negative_slope = found
                    fused = next_qualified
                    # A pass-through in the activation's slot keeps the indices (and state_dict keys).
                    module._modules[next_name] = Fused(activation, name)
            module._modules[name] = self.falinear(child, activation, negative_slope)
            self.summary.converted.append(ConvertedLayer(qualified, activation, fused, _kind(child)))


def as_chain(module: nn.Module) -> nn.Module:
    """An exact ``nn.Sequential`` whose children fuse into at least one chain of FALinear
    (``FASequential``'s rules) made an :class:`~fa_triton.FASequential` in place (its class
    changed: the same object, children, keys, mode, hooks and attributes); any other module as it is."""
    if type(module) is not nn.Sequential:
        return module
    module.__class__ = FASequential
    if not any(isinstance(step, list) for step in module._plan()[0]):
        module.__class__ = nn.Sequential
        del module._plan_cache
    return module


def convert(
    model: nn.Module,
    activation_fusion: bool = True,
    backend: str = "auto",
    inplace: bool = False,
    *,
    include=None,
    exclude=None,
    verbose: bool = False,
    return_summary: bool = False,
    method: str = "fa",
    init: str = "kaiming",
    chains: bool = True,
):
    """Replace every ``nn.Linear`` of ``model`` by an :class:`~fa_triton.FALinear`, every
    ``nn.Conv2d`` by an :class:`~fa_triton.FAConv2d` (the same fusion applies to both).

    Each converted layer keeps the ``nn.Linear``'s own ``weight`` and ``bias`` Parameters
    (values, device, dtype, ``requires_grad`` and weight tying preserved) and gets a freshly
    drawn ``feedback`` (as its ``method`` needs one; from ``init``'s distribution).

    ``method="dfa"`` converts an ``nn.Sequential`` MLP as a whole into a
    :class:`~fa_triton.DFANetwork` (direct feedback alignment): parameter-free modules before the
    first ``nn.Linear`` (e.g. ``nn.Flatten``) become its prefix, each ``nn.Linear`` with the
    fusable activation after it one layer; anything else between the layers is an error.

    With ``activation_fusion``, an ``nn.Linear`` directly followed, inside an ``nn.Sequential``,
    by ``nn.ReLU``, ``nn.LeakyReLU`` (its slope), ``nn.Tanh``, ``nn.Sigmoid``,
    ``nn.GELU(approximate="none")`` or ``nn.Identity`` becomes one FALinear with that activation
    (the fused kernel), and the activation's slot becomes :class:`Fused` (a pass-through): indices and
    state_dict keys do not change. Other layers get ``activation="identity"``.

    Args:
        model: any ``nn.Module`` (an ``nn.Linear`` itself is returned converted).
        activation_fusion: fuse following activation modules as described above.
        backend: the ``backend`` of the new layers (``fa_triton.BACKENDS``).
        inplace: modify ``model`` itself; otherwise a deep copy is converted and ``model`` is untouched.
        include: only convert layers matching these (default: all). Entries are qualified module
            names (``fnmatch`` patterns, e.g. ``"head.*"``) or ``nn.Module`` types; an entry
            matches a layer if it matches the layer or a module containing it.
        exclude: never convert layers matching these (same forms; wins over ``include``), e.g.
            the output layer to keep it trained by backprop. A matching activation is not fused.
        verbose: print the summary.
        return_summary: return ``(model, summary)`` instead of the model.
        method: the layers' rule, one of ``fa_triton.METHODS`` (``fa_triton.methods``), or "dfa".
        init: how new feedback is drawn ("kaiming" or "xavier"; weights are the Linear's own).
        chains: make each ``nn.Sequential`` (the model itself included) that holds two or more
            consecutive converted layers of chaining widths an :class:`~fa_triton.FASequential`,
            in place (the same object, children, state_dict keys, mode and hooks): the chain
            trains as one autograd Function, each layer's f' in the epilogue of the input GEMM
            of the layer above.
    Returns:
        The converted model (and a :class:`ConversionSummary` if ``return_summary``). A model
        with no ``nn.Linear`` to convert is returned as it is (the same object), with a warning.

    ``nn.Linear`` layers whose parent reads their weights without calling them
    (``nn.MultiheadAttention``), subclasses that override ``forward``, uninitialized lazy layers
    and parametrized layers are kept and listed in the summary. Hooks on a converted layer
    are not carried over.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for argument, value in (("activation_fusion", activation_fusion), ("inplace", inplace),
                            ("verbose", verbose), ("return_summary", return_summary), ("chains", chains)):
        if not isinstance(value, bool):
            raise TypeError(f"{argument} must be a bool, got {type(value).__name__}")
    check_backend(backend)
    if method == "dfa":
        return _convert_dfa(model, backend, init, inplace, include, exclude, verbose, return_summary)
    check_method(method, init)
    converter = _Converter(activation_fusion, backend, _selector(include, "include"), _selector(exclude, "exclude"),
                           method, init, chains)

    target = model if inplace else copy.deepcopy(model)
    if isinstance(target, (nn.Linear, nn.Conv2d)):
        result = converter.convert_root(target)
    else:
        converter.visit(target, [("", target)])
        result = as_chain(target) if chains else target
        unknown = [p for p in converter.include_names + converter.exclude_names
                   if not any(fnmatch.fnmatchcase(name, p) for name in converter.seen_names)]
        if unknown:
            raise ValueError(
                f"include/exclude name patterns {unknown} match no module of {type(model).__name__} "
                f"(its modules: {converter.seen_names[:20]}{' ...' if len(converter.seen_names) > 20 else ''})"
            )

    summary = converter.summary
    if not summary.converted:
        result = model  # nothing changed: hand back the caller's own object, not a copy
        kept = f" ({len(summary.kept)} kept: {summary.kept})" if summary.kept else ""
        warnings.warn(
            f"fa_triton.convert: {type(model).__name__} has no nn.Linear layer to convert (nor nn.Conv2d){kept}; "
            "returned unchanged", UserWarning, stacklevel=2,
        )
    if verbose:
        print(summary)
    return (result, summary) if return_summary else result


def _convert_dfa(model, backend, init, inplace, include, exclude, verbose, return_summary):
    """convert(model, method="dfa"): an nn.Sequential MLP rebuilt as a DFANetwork (one fused
    projection kernel); any other network, its layers converted, wrapped in a DFAModel."""

    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if inplace or include is not None or exclude is not None:
        raise ValueError("method='dfa' converts the whole network into a new DFANetwork: inplace, include and "
                         "exclude do not apply")
    is_mlp = isinstance(model, nn.Sequential) and not any(isinstance(m, nn.Conv2d) for m in model.modules())
    if not is_mlp:
        # Any other network (convolutional, residual): its layers in method "backprop" under DFAModel's taps.

        converted, summary = convert(model, backend=backend, method="backprop", init=init, return_summary=True)
        if not summary.converted:
            raise ValueError(f"method='dfa' found no nn.Linear or nn.Conv2d in {type(model).__name__}")
        network = DFAModel(converted, init=init)
        if verbose:
            print(summary)
        return (network, summary) if return_summary else network
    target = copy.deepcopy(model)
    converter = _Converter(True, backend, _selector(None, "include"), _selector(None, "exclude"), "backprop", init)
    slots = list(target.named_children())
    prefix, layers, index = [], [], 0
    while index < len(slots) and not isinstance(slots[index][1], nn.Linear):
        prefix.append(slots[index][1])
        index += 1
    while index < len(slots):
        name, module = slots[index]
        if not isinstance(module, nn.Linear) or _unconvertible(module, target) is not None:
            raise ValueError(f"method='dfa' needs nn.Linear layers, each followed by at most a fusable activation; "
                             f"module {name!r} is a {type(module).__name__}")
        activation, negative_slope, fused = "identity", _DEFAULT_SLOPE, None
        if index + 1 < len(slots) and fusable_activation(slots[index + 1][1]) is not None:
            (activation, negative_slope), fused = fusable_activation(slots[index + 1][1]), slots[index + 1][0]
            index += 1
        layers.append(converter.falinear(module, activation, negative_slope))
        converter.summary.converted.append(ConvertedLayer(name, activation, fused))
        index += 1
    if len(layers) < 2:
        raise ValueError(f"method='dfa' needs at least two nn.Linear layers, got {len(layers)}")
    network = DFANetwork(layers, nn.Sequential(*prefix) if prefix else None, backend=backend, init=init)
    if verbose:
        print(converter.summary)
    return (network, converter.summary) if return_summary else network


def load_linear_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
    """Load a checkpoint of the ``nn.Linear`` model into its converted (FA) model.

    ``state_dict`` is the original model's (or a converted model's) ``state_dict()``; the keys
    are the same, since :func:`convert` keeps them (not for ``method="dfa"``, which rebuilds
    the network). Feedback state that ``state_dict`` lacks (B, brsf's seed and counter) keeps
    the model's own, drawn fresh at conversion (a warning lists it); any that it has is
    loaded, so a converted model's checkpoint round-trips bitwise.

    Raises ``ValueError`` naming the key if a tensor's shape differs from the model's;
    otherwise behaves as ``model.load_state_dict(state_dict, strict)``, whose result it returns.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    own = model.state_dict()
    for key, value in state_dict.items():
        if key in own and isinstance(value, torch.Tensor) and value.shape != own[key].shape:
            raise ValueError(
                f"state_dict[{key!r}] has shape {tuple(value.shape)} but the model's {key!r} has shape "
                f"{tuple(own[key].shape)}: the checkpoint is of a different architecture"
            )
    missing = sorted({key for key in _feedback_keys(model) if key not in state_dict})
    full = dict(state_dict)
    for key in missing:
        full[key] = own[key]  # loads the model's own feedback back: it stays as it is
    result = model.load_state_dict(full, strict=strict)
    if missing:
        warnings.warn(
            f"load_linear_state_dict: the state_dict has no feedback for {missing}; those layers keep the "
            "feedback drawn when they were created", UserWarning, stacklevel=2,
        )
    return result


def _feedback_keys(model: nn.Module) -> list[str]:
    """The state_dict keys of what an FA layer adds to its nn.Linear or nn.Conv2d: its
    ``feedback`` (B, R or kp's Parameter) and brsf's ``feedback_seed`` and ``counter``."""
    keys = []
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (FALinear, FAConv2d)):
            prefix = f"{name}." if name else ""
            if module.feedback is not None:
                keys.append(prefix + "feedback")
            if module.method == "brsf":
                keys += [prefix + "feedback_seed", prefix + "counter"]
    return keys
