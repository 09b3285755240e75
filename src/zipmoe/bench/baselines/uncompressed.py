"""System "uncompressed": the same engine over a `raw`-coder store with one LRU pool of full experts.

bench stage. The MoE-Infinity-style offload baseline: every expert is stored as plain BF16 bytes
(2 bytes per weight read per miss) and the whole expert budget is the F pool (capacities={F: n}),
LRU eviction; same O_DIRECT reads, workers and routing as zipmoe. Sizes in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from zipmoe.bench.baselines.base import Budget, Setup
from zipmoe.bench.baselines.zipmoe_engine import ZipMoESystem, store_geometry
from zipmoe.errors import BudgetTooSmallError
from zipmoe.types import State


@dataclass
class UncompressedSystem(ZipMoESystem):
    name: str = "uncompressed"
    label: str = "uncompressed LRU"
    coder: str = "raw"
    eviction: str | None = "lru"  # the MoE-Infinity-style baseline: whole experts, LRU

    def _capacities(self, setup: Setup, budget: Budget) -> dict[State, int] | None:
        if budget.nbytes is None:
            return None
        geo = store_geometry(setup.stores[self.coder], setup.device)
        left = budget.nbytes - geo["dense"] - geo["staging"]
        if left < 2 * geo["numel"]:
            need = geo["dense"] + geo["staging"] + 2 * geo["numel"]
            raise BudgetTooSmallError(f"budget {budget.nbytes} B holds no full expert next to dense weights and "
                                      f"staging; the uncompressed baseline needs at least {need} B", need)
        return {State.F: min(geo["entries"], left // (2 * geo["numel"]))}
