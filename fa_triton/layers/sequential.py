"""FASequential: an ``nn.Sequential`` whose chains of FA layers train as one autograd Function."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.backends import resolve
from ..ops.sequential import FASequentialFunction
from ..ops.validation import check_inputs
from .linear import FALinear


def _passes_through(module: nn.Module) -> bool:
    """nn.Identity or a subclass that keeps its forward (``convert``'s ``Fused`` slots)."""
    return isinstance(module, nn.Identity) and type(module).forward is nn.Identity.forward


def _plain_falinear(module: nn.Module) -> bool:
    return isinstance(module, FALinear) and type(module).forward is FALinear.forward


class FASequential(nn.Sequential):
    """``nn.Sequential`` in which every chain of two or more consecutive :class:`FALinear`
    children (pass-through children between them, such as ``convert``'s ``Fused`` slots and
    ``nn.Identity``, are skipped) with one ``backend`` runs as one autograd Function
    (``fa_triton.ops.sequential``): activations in the forward GEMMs' epilogues, and in the
    backward each layer's f' in the epilogue of the input GEMM of the layer above, so no pass
    between layers forms δ. Gradients equal the per-layer chain's (the reference backend's
    bitwise; the kernels' within rounding, f' being applied to the fp32 accumulator).

    Any other child runs as in ``nn.Sequential``; so does a chain under ``torch.autocast``,
    ``torch.compile``/``torch.export`` (each layer's traced ops), ``torch.func`` transforms, or
    with hooks on its layers. The printout says which children are fused and why others are not.
    state_dict keys are ``nn.Sequential``'s: a checkpoint of the same children loads either way.

    Raises ``ValueError`` when two consecutive FA layers' widths do not chain.
    """

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._plan_cache = None
        self._plan()

    def _plan(self) -> tuple[list, list[str]]:
        """(steps, notes): each step a child module or a list of FALinear (a fused chain);
        notes: why children next to FA layers are not fused. Cached per set of children."""
        key = tuple((name, id(module)) for name, module in self._modules.items())
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1]
        steps, notes, chain, names = [], [], [], []

        def close():
            if len(chain) >= 2:
                steps.append(list(chain))
            else:
                steps.extend(chain)
            chain.clear()

        for name, module in self._modules.items():
            if module is None or _passes_through(module):
                continue
            if not _plain_falinear(module):
                if chain:
                    notes.append(f"{name} ({type(module).__name__}) is not an FALinear: it runs on its own")
                close()
                steps.append(module)
                continue
            if chain:
                above = chain[-1]
                if above.out_features != module.in_features:
                    raise ValueError(
                        f"FASequential: layer {names[-1]} gives {above.out_features} features but layer {name} "
                        f"takes {module.in_features} (in_features={module.in_features}): the widths must chain")
                if above.backend != module.backend:
                    notes.append(f"{name} has backend={module.backend!r}, {names[-1]} {above.backend!r}: a new chain")
                    close()
            chain.append(module)
            names.append(name)
        close()
        self._plan_cache = (key, (steps, notes))
        return steps, notes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self._plan()[0]:
            x = self._chain(step, x) if isinstance(step, list) else step(x)
        return x

    @staticmethod
    def _chain(layers: list[FALinear], x: torch.Tensor) -> torch.Tensor:
        if not _fusable_now(layers, x):
            for layer in layers:
                x = layer(x)
            return x
        first = layers[0]
        check_inputs(x, first.weight, first.bias, first.feedback, first.activation, first.negative_slope,
                     needs_feedback=first.feedback is not None)
        backend = resolve(first.backend, x)
        specs, params = [], []
        for layer in layers:
            specs.append((layer.activation, layer.negative_slope, layer.rule))
            params += [layer.weight, layer.bias, layer.feedback, layer._draw()]
        return FASequentialFunction.apply(x, backend, tuple(specs), *params)

    def extra_repr(self) -> str:
        steps, notes = self._plan()
        index = {id(module): name for name, module in self._modules.items() if module is not None}
        fused = [f"({', '.join(index[id(layer)] for layer in step)})" for step in steps if isinstance(step, list)]
        text = f"fused=[{', '.join(fused)}]"
        return text + (f", not fused: {'; '.join(notes)}" if notes else "")


def _fusable_now(layers: list[FALinear], x) -> bool:
    """Whether this call can take the fused path: otherwise each layer runs on its own (and
    raises its own clear error for a bad input)."""
    if (torch.compiler.is_compiling() or torch._C._is_any_autocast_enabled()
            or torch._C._are_functorch_transforms_active() or not isinstance(x, torch.Tensor)):
        return False
    first = layers[0].weight
    for layer in layers:
        if layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks:
            return False
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
