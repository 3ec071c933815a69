"""FASequential: an ``nn.Sequential`` whose chains of FA layers train as one autograd Function."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module

from ..ops.backends import TORCH, resolve
from ..ops.sequential import FASequentialFunction
from ..ops.validation import check_inputs
from .linear import FALinear


def _hooked(module: nn.Module) -> bool:
    """Whether the module has hooks of its own that a fused call would skip."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def _global_hooks() -> bool:
    """Whether module hooks are registered for every module (``register_module_forward_hook``...)."""
    return any(getattr(_module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))


def _passes_through(module: nn.Module) -> bool:
    """nn.Identity, or a subclass that keeps its forward (``convert``'s ``Fused`` slots), without hooks."""
    return isinstance(module, nn.Identity) and type(module).forward is nn.Identity.forward and not _hooked(module)


def _plain_falinear(module: nn.Module) -> bool:
    return isinstance(module, FALinear) and type(module).forward is FALinear.forward and not _hooked(module)


class FASequential(nn.Sequential):
    """``nn.Sequential`` in which every chain of two or more consecutive :class:`FALinear`
    children with one ``backend`` runs as one autograd Function (``fa_triton.ops.sequential``):
    activations in the forward GEMMs' epilogues, and in the backward each layer's f' in the
    epilogue of the input GEMM of the layer above, so no pass between layers forms δ. Gradients
    equal the per-layer chain's: on the reference backend bitwise, but that a backprop layer in
    a chain of other methods sums its grad_W in another order than its own eager call (PyTorch's
    autograd); on the kernels within rounding (f' applied to the fp32 accumulator; on
    ``backend="triton"`` a narrow chain runs the fused MLP kernels, docs/kernels.md).
    Pass-through children between chained layers (``convert``'s ``Fused`` slots,
    ``nn.Identity``) are skipped. A chain of backprop layers on the reference backend runs layer
    by layer, under PyTorch's own autograd (as each such layer does: that rule exactly, at the
    least cost per call).

    Any other child runs as in ``nn.Sequential``, and so does a child with hooks of its own. A
    chain runs layer by layer under ``torch.autocast``, ``torch.compile``/``torch.export`` (each
    layer's traced ops), ``torch.func`` transforms, with module hooks registered globally, or
    when its layers' dtypes, devices or widths do not fit (each layer then raises its own clear
    error). The printout says which children are fused and why others are not. state_dict keys
    are ``nn.Sequential``'s: a checkpoint of the same children loads either way.
    """

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._plan_cache = None
        self._chain_fits = {}  # id(chain step of the cached plan) -> (its layers' fits, the chain's fit)

    def __getstate__(self):
        # A copy or pickle plans its own chains: the cached plan and fits are keyed by this
        # object's ids, and hold resolved backends (their torch.library ops cannot be pickled).
        return {**super().__getstate__(), "_plan_cache": None, "_chain_fits": {}}

    def _plan(self) -> tuple[list, list[str]]:
        """(steps, notes): each step a child module or a list of (name, FALinear) (a fused
        chain); notes: why children next to FA layers are not fused. Cached per children, their
        hooks and backends."""
        if torch.compiler.is_compiling():
            # Built afresh while tracing: the graph would be guarded on the cache, and the
            # first eager call's fill would recompile it.
            return self._build_plan()
        key = tuple((name, id(module), _hooked(module), getattr(module, "backend", None))
                    for name, module in self._modules.items() if module is not None)
        cache = getattr(self, "_plan_cache", None)
        if cache is not None and cache[0] == key:
            return cache[1]
        plan = self._build_plan()
        self._plan_cache = (key, plan)
        self._chain_fits = {}  # keyed by the steps' ids: a new plan, new steps
        return plan

    def _build_plan(self) -> tuple[list, list[str]]:
        steps, notes, pending = [], [], []  # pending: (name, module) of the chain being built

        def close():
            chain = [(name, module) for name, module in pending if isinstance(module, FALinear)]
            if len(chain) >= 2:
                steps.append(chain)
            else:
                steps.extend(module for _, module in pending)
            pending.clear()

        def last_layer():
            return next(((name, m) for name, m in reversed(pending) if isinstance(m, FALinear)), None)

        for name, module in self._modules.items():
            if module is None:
                continue
            if _passes_through(module) and pending:
                pending.append((name, module))
                continue
            if not _plain_falinear(module):
                if pending or isinstance(module, FALinear):
                    why = "has hooks" if _hooked(module) else f"({type(module).__name__}) is not an FALinear"
                    notes.append(f"{name} {why}: it runs on its own")
                close()
                steps.append(module)
                continue
            above = last_layer()
            if above is not None:
                above_name, above_layer = above
                if above_layer.out_features != module.in_features:
                    notes.append(f"{above_name} gives {above_layer.out_features} features but {name} takes "
                                 f"{module.in_features}: not fused")
                    close()
                elif above_layer.backend != module.backend:
                    notes.append(f"{name} has backend={module.backend!r}, {above_name} {above_layer.backend!r}: "
                                 "a new chain")
                    close()
            pending.append((name, module))
        close()
        return steps, notes

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Sequential's name
        x = input
        for step in self._plan()[0]:
            x = self._chain(step, x) if isinstance(step, list) else step(x)
        return x

    def _chain(self, step: list, x: torch.Tensor) -> torch.Tensor:
        layers = [layer for _, layer in step]
        fits = self._fast_fits(step, layers, x)
        if fits is None:
            if not _fusable_now(layers, x):
                for layer in layers:
                    x = layer(x)
                return x
            first = layers[0]
            check_inputs(x, first.weight, first.bias, first.feedback, first.activation, first.negative_slope,
                         needs_feedback=first.feedback is not None)
            fits = self._record_fits(step, layers, x)
        backend = fits[0]
        if backend is TORCH and all(rule.method == "backprop" for *_, rule in fits[1]):
            for layer in layers:  # PyTorch's own autograd (FALinear's eager_runner): nothing to fuse
                x = layer(x)
            return x
        specs, params = [], []
        for layer, (weight, bias, feedback, rule) in zip(layers, fits[1]):
            specs.append((layer._activation, layer._negative_slope, rule))
            params += [weight, bias, feedback, layer._draw() if rule.draws else None]
        return FASequentialFunction.apply(x, backend, tuple(specs), *params)

    def _fast_fits(self, step: list, layers: list[FALinear], x) -> tuple | None:
        """The chain's recorded (backend, per layer (weight, bias, feedback, rule)) when this call
        is like the last checked one — every layer's own fit still current (``FALinear._current_fit``:
        the same tensors and rule, so the widths, dtypes and devices checked then still fit) and
        an x of the same dtype, width and device, in plain eager mode without global hooks —
        else None (the full checks run)."""
        if torch.compiler.is_compiling():  # traced, the record would be guarded on
            return None
        recorded = self.__dict__.get("_chain_fits", _NO_FITS).get(id(step))  # (a pickle from before has none)
        if recorded is None:
            return None
        layer_fits, fits = recorded
        first = layer_fits[0]
        if not (type(x) is torch.Tensor and x.dtype is first[4] and x.dim() != 0 and x.shape[-1] == first[5]
                and x.device == first[6] and not torch._C._is_any_autocast_enabled()
                and not torch._C._are_functorch_transforms_active() and not _global_hooks()):
            return None
        for layer, fit in zip(layers, layer_fits):
            if layer._current_fit() is not fit:
                return None
        return fits

    def _record_fits(self, step: list, layers: list[FALinear], x) -> tuple:
        """Resolve the chain's backend for x (raising if it cannot run there), record each
        layer's fit and the chain's, and return (backend, per layer (weight, bias, feedback, rule))."""
        backend = resolve(layers[0].backend, x)
        layer_fits, tensors = [], []
        plain = type(x) is torch.Tensor
        for layer in layers:
            weight, bias, feedback = layer.weight, layer.bias, layer.feedback
            tensors.append((weight, bias, feedback, layer.rule))
            if plain:
                layer._fit = None  # a fit _record_fit declines (a parametrization) must not linger
                layer._record_fit(weight, bias, feedback)
                layer_fits.append(layer._fit)
        fits = (backend, tuple(tensors))
        if plain and all(fit is not None for fit in layer_fits):
            self.__dict__.setdefault("_chain_fits", {})[id(step)] = (tuple(layer_fits), fits)
        return fits

    def extra_repr(self) -> str:
        steps, notes = self._plan()
        fused = [f"({', '.join(name for name, _ in step)})" for step in steps if isinstance(step, list)]
        text = f"fused=[{', '.join(fused)}]"
        return text + (f", not fused: {'; '.join(notes)}" if notes else "")


_NO_FITS: dict = {}


def _fusable_now(layers: list[FALinear], x) -> bool:
    """Whether this call can take the fused path: otherwise each layer runs on its own (and
    raises its own clear error for a bad input)."""
    if (torch.compiler.is_compiling() or torch._C._is_any_autocast_enabled()
            or torch._C._are_functorch_transforms_active() or not isinstance(x, torch.Tensor) or _global_hooks()):
        return False
    first = layers[0].weight
    for layer in layers:
        weight, bias, feedback = layer.weight, layer.bias, layer.feedback
        if weight.dtype != first.dtype or weight.device != first.device or weight.dim() != 2:
            return False
        if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype
                                 or bias.device != weight.device):
            return False
        if feedback is not None and (feedback.shape != weight.shape or feedback.dtype != weight.dtype
                                     or feedback.device != weight.device):
            return False
    return all(above.weight.shape[0] == below.weight.shape[1] for above, below in zip(layers, layers[1:]))
