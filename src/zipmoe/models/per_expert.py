"""models/per_expert.py: serve experts kept as one nn.Module each (ModuleAdapter models) from an ExpertSource.

Stage: models, like compute.py, for the layouts transformers does not fuse (SwitchTransformers). Each
experts container's class is swapped for a subclass (no bound method on the instance, so no cycle keeps
the model alive) whose forward is the adapter's copy of transformers' loop: it asks the source for every
needed expert at once, runs each as its weights arrive through the adapter's copy of the expert module's
forward, with the served weights passed as arguments (the same kernels, hence the same bits; nothing is
written into the module, so concurrent forwards on other threads are safe), and combines in the
reference's order. With every expert resident (serve_resident), the expert modules get
views of the F pool as their weights and transformers' own forward runs. Inference only: in training
mode an expert's dropout would draw its random numbers in arrival order.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from zipmoe.errors import UnsupportedModelError
from zipmoe.models.base import DOWN, GATE, UNGATED, UP, ExpertSource, ModuleAdapter
from zipmoe.models.compute import takes_tokens, to_meta


def _served_forward(self: nn.Module, *args, **kwargs) -> torch.Tensor:
    if self._zipmoe_resident is not None:  # transformers' own forward on the pool's views
        return self._zipmoe_resident(self, *args, **kwargs)
    return self._zipmoe_experts_forward(self, *args, **kwargs)


@functools.cache
def _served_class(cls: type) -> type:
    """`cls` with its forward replaced by _served_forward."""
    return type(f"ZipMoE{cls.__name__}", (cls,), {"forward": _served_forward, "_zipmoe_base": cls})


def _base_class(module: nn.Module) -> type:
    """The transformers class of a container, whether or not it is served already."""
    return type(module).__dict__.get("_zipmoe_base", type(module))


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


def _linears(adapter: ModuleAdapter, expert: nn.Module) -> list[tuple[nn.Module, str]]:
    """(owner module, attribute) of each stored projection's weight, in flat-vector order."""
    out = []
    for proj in adapter.projections:
        owner, _, attr = f"{adapter.linears[proj]}.weight".rpartition(".")
        out.append((expert.get_submodule(owner), attr))
    return out


def expert_weights(adapter: ModuleAdapter, expert: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert module's weights as the engine serves them: (gate_up, or up when not gated; down)."""
    w = {p: getattr(owner, attr) for p, (owner, attr) in zip(adapter.projections, _linears(adapter, expert),
                                                             strict=True)}
    return (torch.cat([w[GATE], w[UP]]) if GATE in w else w[UP]), w[DOWN]


def check_reference(adapter: ModuleAdapter, reference: str | None) -> None:
    """These models have one implementation, their own loop: "eager" (None means the same)."""
    if reference not in (None, "eager"):
        raise UnsupportedModelError(f"{adapter.model_type} runs its experts with its own loop only: "
                                    f"experts_implementation={reference!r} does not apply (use 'eager' or none)")


def install(model: nn.Module, source: ExpertSource, adapter: ModuleAdapter, reference: str | None = None) -> list[int]:
    """Serve every experts container of `model` from `source`; returns the MoE layer ids (install again to
    change the source). reference: these models have one implementation, their own loop ("eager")."""
    check_reference(adapter, reference)
    if adapter.projections not in (UNGATED, (GATE, UP, DOWN)):
        raise UnsupportedModelError(f"{adapter.model_type}: projections {adapter.projections} are not served")
    found = containers(model, adapter)
    n = adapter.num_experts(model.config.to_dict())
    for layer, _, module in found:
        experts = [module[adapter.child.format(expert=e)] for e in range(n)]
        for expert in experts:  # hold no memory: the engine serves these
            for owner, attr in _linears(adapter, expert):
                to_meta(owner, attr)
        module.__class__ = _served_class(_base_class(module))
        module._zipmoe_source = source
        module._zipmoe_takes_tokens = takes_tokens(source)
        module._zipmoe_layer = layer
        module._zipmoe_experts = experts  # expert j's module, resolved once (a plain list: not registered)
        module._zipmoe_experts_forward = adapter.experts_forward
        module._zipmoe_resident = None  # serve_resident: transformers' own forward
    model._zipmoe_reference = "eager"
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
        rows = gate_up.shape[1] // 2
        for e, expert in enumerate(module._zipmoe_experts):
            parts = (gate_up[e, :rows], gate_up[e, rows:]) if GATE in adapter.linears else (gate_up[e],)
            for (owner, attr), tensor in zip(_linears(adapter, expert), (*parts, down[e]), strict=True):
                setattr(owner, attr, nn.Parameter(tensor, requires_grad=False))
        module._zipmoe_resident = _base_class(module).forward
    return True


def release_resident(model: nn.Module, adapter: ModuleAdapter) -> None:
    """Undo serve_resident (at unload): the expert modules let go of the pool's memory."""
    for _, _, module in containers(model, adapter):
        if getattr(module, "_zipmoe_resident", None) is not None:
            for expert in module._zipmoe_experts:
                for owner, attr in _linears(adapter, expert):
                    to_meta(owner, attr)
            module._zipmoe_resident = None

