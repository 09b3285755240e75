"""PlannedAdmission: decisions by live rank, and a real ExpertCache that ends up in the planned layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zipmoe.cache import ExpertCache, MemoryBudget
from zipmoe.cache.policy import Decision
from zipmoe.planner.admission import PlannedAdmission
from zipmoe.planner.capacity import PoolPlan
from zipmoe.planner.stats import RoutingStats
from zipmoe.types import ExpertKey, State

E = 8
NUMEL, E_SLOT, ALIGN = 256, 64, 64
CAPS_ALL = {State.F: 9, State.C: 9, State.S: 9, State.E: 9}


def make_plan(sizes=((1, 2, 1, 2), (2, 0, 0, 0))) -> PoolPlan:
    from zipmoe.planner.stats import RankSnapshot

    snap = RankSnapshot((0, 1), np.zeros((2, E)), (0.0, 0.0))
    return PoolPlan((0, 1), sizes, E, (2 * NUMEL, 2 * ALIGN * 4, NUMEL, ALIGN), 1.0, (0.5, 0.5), 2.0, snap)


def ranked_stats() -> RoutingStats:
    """Layer 0: expert 7 most used, then 6, 5, ... (rank r = expert 7 - r). Layer 1: same."""
    st = RoutingStats([0, 1], E, decay=1.0)
    for layer in (0, 1):
        for e in range(E):
            for _ in range(e + 1):
                st.observe(layer, [e])
    return st


def test_decisions_follow_rank_ranges():
    adm = PlannedAdmission(make_plan(), ranked_stats())
    want = [Decision(True, None), Decision(False, State.C), Decision(False, State.C), Decision(False, State.S),
            Decision(False, State.E), Decision(False, State.E), Decision(False, None), Decision(False, None)]
    got = [adm.decide(ExpertKey(0, 7 - r), State.MISS, CAPS_ALL) for r in range(E)]
    assert got == want
    assert adm.decide(ExpertKey(1, 6), State.MISS, CAPS_ALL) == Decision(True, None)
    assert adm.decide(ExpertKey(1, 5), State.MISS, CAPS_ALL) == Decision(False, None)
    no_f = {**CAPS_ALL, State.F: 0}
    assert adm.decide(ExpertKey(0, 7), State.MISS, no_f) == Decision(False, None)


def test_ranks_move_with_statistics_and_plans_swap():
    st = ranked_stats()
    adm = PlannedAdmission(make_plan(), st)
    for _ in range(50):
        st.observe(0, [0])
    assert adm.decide(ExpertKey(0, 0), State.C, CAPS_ALL) == Decision(True, None)
    adm.set_plan(make_plan(((0, 0, 0, 8), (0, 0, 0, 0))))
    assert adm.decide(ExpertKey(0, 0), State.C, CAPS_ALL) == Decision(False, State.E)


def test_demotion_is_strict_unless_asked():
    st = ranked_stats()
    assert PlannedAdmission(make_plan(), st).demote(State.C, CAPS_ALL) is None
    loose = PlannedAdmission(make_plan(), st, demote=True)
    assert loose.demote(State.C, CAPS_ALL) is State.S
    assert loose.demote(State.C, {**CAPS_ALL, State.S: 0}) is State.E
    assert loose.demote(State.S, CAPS_ALL) is None


@pytest.mark.parametrize("rounds", [1, 3])
def test_a_real_cache_reaches_the_planned_layout(rounds):
    """Every expert of both layers loaded once (or repeatedly): each sits in the pool of its rank range."""
    plan, st = make_plan(), ranked_stats()
    cache = ExpertCache(MemoryBudget("1MiB"), NUMEL, E_SLOT, capacities=plan.capacities, align=ALIGN,
                        admission=PlannedAdmission(plan, st))
    try:
        for _ in range(rounds):
            for layer in (0, 1):
                for e in range(E):
                    key = ExpertKey(layer, e)
                    with cache.acquire([key]):
                        cache.admit_copy(key, sm=np.full(NUMEL, e, np.uint8), e=np.full(16, e, np.uint8),
                                         full=torch.full((NUMEL,), float(e), dtype=torch.bfloat16))
        cache.check_invariants()
        for layer in (0, 1):
            for e in range(E):
                planned = plan.pool_of(layer, st.rank_of(layer, e))
                assert cache.state(ExpertKey(layer, e)) is (State.MISS if planned is None else planned)
    finally:
        cache.close()
