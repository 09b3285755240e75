"""Reference ExpertSource implementations (tests, debugging): experts held in memory.

InMemoryExpertSource copies each requested expert out of full fused tensors (so the model under
test never shares storage with the reference) and yields them in a shuffled order, proving that
results do not depend on the order in which the engine makes experts ready.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence

import torch

from zipmoe.models import per_expert
from zipmoe.models.base import ModuleAdapter
from zipmoe.models.compute import experts_modules, in_proj
from zipmoe.models.registry import get_adapter


class InMemoryExpertSource:
    """Serves experts from {layer: (gate_up [E,2I,H], down [E,H,I])}; counts what it served."""

    def __init__(self, weights: Mapping[int, tuple[torch.Tensor, torch.Tensor]], seed: int = 0):
        self.weights = dict(weights)
        self.rng = random.Random(seed)
        self.calls: list[tuple[int, tuple[int, ...]]] = []  # (layer, needed) per layer call

    @classmethod
    def from_model(cls, model: torch.nn.Module, seed: int = 0) -> InMemoryExpertSource:
        """Snapshot (clone) the expert tensors of a plain transformers model, fused or per expert."""
        adapter = get_adapter(model.config.model_type)
        if not isinstance(adapter, ModuleAdapter):
            return cls({layer: (getattr(m, in_proj(m)).detach().clone(), m.down_proj.detach().clone())
                        for layer, _, m in experts_modules(model)}, seed)
        weights = {}
        for layer, name, _ in per_expert.containers(model, adapter):
            pairs = [per_expert.expert_weights(adapter, model.get_submodule(f"{name}.{adapter.child.format(expert=e)}"))
                     for e in range(adapter.num_experts(model.config.to_dict()))]
            weights[layer] = tuple(torch.stack(ws).detach().clone() for ws in zip(*pairs, strict=True))
        return cls(weights, seed)

    def experts(self, layer: int, needed: Sequence[int],
                tokens: Sequence[int] | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield fresh copies of the needed experts in a random order (tokens: only a caching hint)."""
        self.calls.append((layer, tuple(needed)))
        gate_up, down = self.weights[layer]
        order = list(needed)
        self.rng.shuffle(order)
        for expert in order:
            yield expert, gate_up[expert].clone(), down[expert].clone()
