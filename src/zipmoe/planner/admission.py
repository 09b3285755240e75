"""PlannedAdmission: the cache's AdmissionPolicy that places a loaded expert by its current rank.

Arrow: PoolPlan (capacity.py) + RoutingStats (live ranks) ──▶ ExpertCache.targets() decisions.
Engine thread, once per loaded expert: one rank lookup (a re-sort of that layer at most once per
layer call) and four comparisons. The plan can be swapped from a planning thread (set_plan): a
single attribute store, so a decision sees either the old or the new plan, never a mix.

Why this never changes outputs: admission only decides which planes stay resident; every expert
computed is still the bit-exact BF16 the store holds (checksummed reads, lossless decode).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING

from zipmoe.planner.capacity import PoolPlan
from zipmoe.planner.stats import RoutingStats
from zipmoe.types import ExpertKey, State

if TYPE_CHECKING:
    from zipmoe.cache.policy import Decision


@functools.cache
def _decisions() -> dict[State | None, Decision]:
    """One Decision per pool, built once. Imported here, not at module level: the zipmoe.cache package
    imports torch, and planner modules stay importable without it (only the engine builds this)."""
    from zipmoe.cache.policy import Decision

    return {None: Decision(full=False, host=None), State.F: Decision(full=True, host=None),
            State.C: Decision(full=False, host=State.C), State.S: Decision(full=False, host=State.S),
            State.E: Decision(full=False, host=State.E)}


class PlannedAdmission:
    """Admit each loaded expert to the pool of its layer's rank range; keep the miss range out.

    demote: what an entry evicted from a host pool becomes. The cache does not say which expert it
    is, so by default nothing (the rank layout stays strict: the victim is usually an expert whose
    rank left the range); with demote=True a C victim keeps its SM plane in S (or its exponents in
    E) when that pool exists, like KeepAll.
    """

    def __init__(self, plan: PoolPlan, stats: RoutingStats, demote: bool = False):
        self.plan, self.stats, self._demote = plan, stats, demote
        self._decision = _decisions()

    def set_plan(self, plan: PoolPlan) -> None:
        """Swap in a new plan (e.g. from replan() on a planning thread)."""
        self.plan = plan

    def decide(self, key: ExpertKey, state: State, capacity: Mapping[State, int]) -> Decision:
        """Pool of the expert's current rank; a pool with no capacity keeps nothing."""
        pool = self.plan.pool_of(key.layer, self.stats.rank_of(key.layer, key.expert))
        if pool is None or capacity[pool] <= 0:
            return self._decision[None]
        return self._decision[pool]

    def demote(self, host: State, capacity: Mapping[State, int]) -> State | None:
        """See the class docstring."""
        if not self._demote or host is not State.C:
            return None
        for lower in (State.S, State.E):
            if capacity[lower] > 0:
                return lower
        return None
