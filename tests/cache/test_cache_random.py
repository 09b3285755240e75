"""Random layer sequences: budget never exceeded, slabs never reallocated, data never mixed up,
leased experts never evicted, bookkeeping consistent after every step."""

import random

import pytest
from cache_helpers import ALIGN, E_SLOT, NUMEL, e_of, full_of, holds_right_data, k, sm_of

from zipmoe.cache import ExpertCache, MemoryBudget
from zipmoe.errors import BudgetTooSmallError
from zipmoe.types import State

KEYS = [k(i, layer) for layer in range(2) for i in range(10)]


def _fill_or_fail(cache: ExpertCache, rng: random.Random, key) -> None:
    """Fill the claimed slots with the key's data and commit, or with garbage and abort (a failed load)."""
    t = cache.targets(key)
    if rng.random() < 0.1:
        for buf in (t.sm, t.e):
            if buf is not None:
                buf[:] = 0xAA
        if t.full is not None:
            t.full.fill_(-1.0)
        if rng.random() < 0.5:
            cache.abort(key)
        return  # else: the lease's release aborts it
    e = e_of(key)
    if t.sm is not None:
        t.sm[:NUMEL] = sm_of(key)
    if t.e is not None:
        t.e[: e.nbytes] = e
    if t.full is not None:
        t.full.copy_(full_of(key))
    cache.commit(key, e_nbytes=e.nbytes)


def _step(cache: ExpertCache, rng: random.Random, outer: list) -> None:
    needed = rng.sample(KEYS, rng.randint(1, 5))
    with cache.acquire(needed) as lease:
        before = dict(zip(needed, lease.states, strict=True))
        for key in needed:
            _fill_or_fail(cache, rng, key)
            for other, st in before.items():  # other claims must not touch what this layer reads
                if other != key:
                    assert holds_right_data(cache, other, st), f"{other} lost its {st.name} data"
    for key, st in outer:  # leased across the step: same bytes, and the same state unless it was loaded
        assert holds_right_data(cache, key, st)
        assert key in needed or cache.state(key) is st


@pytest.mark.parametrize("eviction", ["lru", "lfu", "fifo"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_layers_keep_every_invariant(eviction: str, seed: int) -> None:
    rng = random.Random(seed)
    caps = {p: rng.randint(0, 4) for p in (State.F, State.C, State.S, State.E)}
    budget = MemoryBudget(rng.randint(40_000, 80_000))
    budget.reserve("dense", 10_000)
    try:
        cache = ExpertCache(budget, NUMEL, E_SLOT, capacities=caps, eviction=eviction, align=ALIGN,
                            staging_slots=1)
    except BudgetTooSmallError as err:
        assert err.minimum_bytes > budget.total
        return
    slabs = [(s.tensor.data_ptr(), s.nbytes) for s in (cache._f, cache._sm, cache._e)]
    stagings = []
    for _ in range(300):
        outer_keys = rng.sample(KEYS, rng.randint(0, 2))
        with cache.acquire(outer_keys) as outer:
            _step(cache, rng, list(zip(outer_keys, outer.states, strict=True)))
        if rng.random() < 0.1:
            try:
                stagings.append(cache.staging(rng.randint(1, 3)))
            except BudgetTooSmallError as err:
                assert err.minimum_bytes > budget.total and budget.used() <= budget.total
        if stagings and rng.random() < 0.1:
            cache.release_staging(stagings.pop(rng.randrange(len(stagings))))
        cache.check_invariants()
        assert budget.used() <= budget.total and budget.peak() <= budget.total
        assert all(holds_right_data(cache, key) for key in KEYS)
    assert [(s.tensor.data_ptr(), s.nbytes) for s in (cache._f, cache._sm, cache._e)] == slabs
    hits = sum(v for name, v in cache.counters.items() if name.startswith("lookup.") and "MISS" not in name)
    assert hits > 0 or sum(caps.values()) == 0
