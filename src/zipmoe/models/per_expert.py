"""models/per_expert.py: serve experts kept as one nn.Module each (ModuleAdapter models) from an ExpertSource.

Stage: models, like compute.py, for the layouts transformers does not fuse (SwitchTransformers). Each
experts container gets its adapter's rewrite of transformers' loop, which asks the source for every
needed expert at once, runs each expert's own module on the served weights as they arrive
(torch.func.functional_call: the module's own forward, so the same kernels and bits as plain
transformers) and combines the outputs in the reference's order. The container's class is swapped for a
subclass (no bound-method cycle keeps the model alive). With every expert resident (serve_resident),
the expert modules get views of the F pool as their weights and transformers' own forward runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.func import functional_call

from zipmoe.errors import UnsupportedModelError
from zipmoe.models.base import DOWN, GATE, UNGATED, UP, ExpertSource, ModuleAdapter
from zipmoe.models.compute import takes_tokens

ExpertCall = Callable[[torch.Tensor], torch.Tensor]


class ServedExperts:
    """What an adapter's experts loop sees: the needed experts, each as a call of its own module."""

    __slots__ = ("container",)

    def __init__(self, container: nn.Module):
        self.container = container

    def served(self, needed: list[int], tokens: list[int]) -> Iterator[tuple[int, ExpertCall]]:
        """(expert, run) for every needed expert as its weights become ready; run(x) = the expert on x,
        valid until the next item is asked for (the source may recycle the weights' buffer)."""
        c = self.container
        source: ExpertSource = c._zipmoe_source
        stream = (source.experts(c._zipmoe_layer, needed, tokens=tokens) if c._zipmoe_takes_tokens
                  else source.experts(c._zipmoe_layer, needed))
        for expert, gate_up, down in stream:
            module = c[c._zipmoe_child.format(expert=expert)]
            yield expert, functools.partial(functional_call, module, _weights(c._zipmoe_linears, gate_up, down))


def _weights(linears: Mapping[str, str], gate_up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
    """Parameter name -> served tensor for one expert module (gate_up is just up for a non-gated expert)."""
    if GATE not in linears:
        return {f"{linears[UP]}.weight": gate_up, f"{linears[DOWN]}.weight": down}
    rows = gate_up.shape[0] // 2
    return {f"{linears[GATE]}.weight": gate_up[:rows], f"{linears[UP]}.weight": gate_up[rows:],
            f"{linears[DOWN]}.weight": down}


def _served_forward(self: nn.Module, *args, **kwargs):
    if self._zipmoe_resident:
        return self._zipmoe_reference_forward(*args, **kwargs)  # a class attribute: bound
    return self._zipmoe_experts_forward(self, ServedExperts(self), *args, **kwargs)


@functools.cache
def _served_class(cls: type) -> type:
    """`cls` with its forward replaced by _served_forward (the original kept as the reference)."""
    return type(f"ZipMoE{cls.__name__}", (cls,), {"forward": _served_forward, "_zipmoe_reference_forward": cls.forward})


def containers(model: nn.Module, adapter: ModuleAdapter) -> list[tuple[int, str, nn.Module]]:
    """(MoE layer id, name, experts container) of every MoE layer the adapter names in `model`."""
    found = []
    for layer, name in adapter.containers(model.config.to_dict()):
        try:
            found.append((layer, name, model.get_submodule(name)))
        except AttributeError as e:
            raise UnsupportedModelError(f"{type(model).__name__} has no experts module {name!r} that the "
                                        f"{adapter.model_type} adapter expects: {e}") from None
    return found


def expert_parameter_names(model: nn.Module, adapter: ModuleAdapter) -> set[str]:
    """The model's routed-expert weight names (they stay meta: the engine serves them)."""
    return {n.name for n in adapter.expert_names(model.config.to_dict())}


def install(model: nn.Module, source: ExpertSource, adapter: ModuleAdapter, reference: str | None = None) -> list[int]:
    """Serve every experts container of `model` from `source`; returns the MoE layer ids. reference: these
    models have one implementation, their own loop ("eager"; None means the same)."""
    if reference not in (None, "eager"):
        raise UnsupportedModelError(f"{adapter.model_type} runs its experts with its own loop only: "
                                    f"experts_implementation={reference!r} does not apply (use 'eager' or none)")
    if adapter.projections != UNGATED and set(adapter.projections) != {GATE, UP, DOWN}:
        raise UnsupportedModelError(f"{adapter.model_type}: projections {adapter.projections} are not served")
    found = containers(model, adapter)
    _to_meta(model, expert_parameter_names(model, adapter))  # hold no memory: the engine serves these
    for layer, _, module in found:
        module.__class__ = _served_class(type(module))
        module._zipmoe_source = source
        module._zipmoe_takes_tokens = takes_tokens(source)
        module._zipmoe_layer = layer
        module._zipmoe_child = adapter.child
        module._zipmoe_linears = dict(adapter.linears)
        module._zipmoe_experts_forward = adapter.experts_forward
        module._zipmoe_resident = False
    model._zipmoe_reference = "eager"  # these models have one implementation: their own loop
    return [layer for layer, _, _ in found]


def serve_resident(model: nn.Module, source: ExpertSource, adapter: ModuleAdapter) -> bool:
    """Every expert held decoded in place for good: give each expert module views of the F pool as its
    weights and run transformers' own forward. False: nothing changed."""
    resident = getattr(source, "resident_weights", None)
    found = containers(model, adapter)
    n = adapter.num_experts(model.config.to_dict())
    weights = [resident(layer, n) for layer, _, _ in found] if resident is not None else [None]
    if not found or any(w is None for w in weights):
        return False
    for (_, _, module), (gate_up, down) in zip(found, weights, strict=True):
        for e in range(n):
            expert = module[adapter.child.format(expert=e)]
            for pname, tensor in _weights(adapter.linears, gate_up[e], down[e]).items():
                owner, attr = pname.rsplit(".", 1)
                setattr(expert.get_submodule(owner), attr, nn.Parameter(tensor, requires_grad=False))
        module._zipmoe_resident = True
    return True


def release_resident(model: nn.Module, adapter: ModuleAdapter) -> None:
    """Undo serve_resident (at unload): the expert modules let go of the pool's memory."""
    for _, _, module in containers(model, adapter):
        module._zipmoe_resident = False
    _to_meta(model, expert_parameter_names(model, adapter))


def _to_meta(model: nn.Module, names: Iterable[str]) -> None:
    """Replace these parameters by meta placeholders of the same shape and dtype (no memory)."""
    for name in names:
        owner, attr = name.rsplit(".", 1)
        module = model.get_submodule(owner)
        old = getattr(module, attr)
        if not old.is_meta:
            setattr(module, attr, nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"),
                                               requires_grad=False))
