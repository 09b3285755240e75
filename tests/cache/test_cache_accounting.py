"""MemoryBudget: reservations, peak, breakdown and the minimum named by BudgetTooSmallError."""

import pytest

from zipmoe.cache import ExpertCache, MemoryBudget
from zipmoe.errors import BudgetTooSmallError, ZipMoEError
from zipmoe.types import State


def test_reserve_release_peak_breakdown() -> None:
    b = MemoryBudget("1KiB")
    assert b.total == 1024
    b.reserve("dense", 600)
    b.reserve("staging.0", 300)
    assert (b.used(), b.free(), b.peak()) == (900, 124, 900)
    assert b.breakdown() == {"dense": 600, "staging.0": 300}
    assert b.release("dense") == 600
    assert (b.used(), b.peak()) == (300, 900)
    assert b.release("nope") == 0


def test_over_budget_names_the_minimum_and_changes_nothing() -> None:
    b = MemoryBudget(1000)
    b.reserve("dense", 700)
    with pytest.raises(BudgetTooSmallError) as err:
        b.reserve("pool.F", 400)
    assert err.value.minimum_bytes == 1100
    assert "1100 bytes" in str(err.value) and "pool.F" in str(err.value)
    assert b.used() == 700 and b.breakdown() == {"dense": 700}
    b.reserve("pool.F", 300)  # exactly full is fine
    assert b.free() == 0


def test_bad_reservations_are_rejected() -> None:
    b = MemoryBudget(100)
    b.reserve("x", 1)
    with pytest.raises(ZipMoEError, match="already exists"):
        b.reserve("x", 1)
    with pytest.raises(ZipMoEError, match="negative"):
        b.reserve("y", -1)
    with pytest.raises(ZipMoEError, match="cannot parse"):
        MemoryBudget("lots")


def test_cache_minimum_counts_dense_staging_and_every_pool() -> None:
    numel, e_slot, align = 1000, 300, 64  # entry bytes: F 2000, SM 1024, E 320
    b = MemoryBudget(10_000)
    b.reserve("dense", 4000)
    caps = {State.F: 2, State.C: 2, State.S: 1, State.E: 3}
    pools = 2 * 2000 + 2 * (1024 + 320) + 1024 + 3 * 320
    staging = 2 * (1024 + 320 + 2000)  # CPU: no decoded-exponent buffers
    with pytest.raises(BudgetTooSmallError) as err:
        ExpertCache(b, numel, e_slot, capacities=caps, staging_slots=2, align=align)
    assert err.value.minimum_bytes == 4000 + staging + pools
    assert b.breakdown() == {"dense": 4000}  # nothing leaked by the failed construction
    ok = MemoryBudget(4000 + staging + pools)
    ok.reserve("dense", 4000)
    cache = ExpertCache(ok, numel, e_slot, capacities=caps, staging_slots=2, align=align)
    assert ok.used() == ok.total == ok.peak()
    assert cache.pool_nbytes() == {State.F: 4000, State.C: 2688, State.S: 1024, State.E: 960}
    cache.close()
    assert ok.breakdown() == {"dense": 4000}


def test_staging_is_accounted_and_released() -> None:
    b = MemoryBudget(100_000)
    cache = ExpertCache(b, 1000, 300, capacities={}, align=64)
    before = b.used()
    st = cache.staging(3, exp=True)
    assert b.used() - before == cache.staging_nbytes(3, exp=True) == 3 * (1024 + 320 + 1024 + 2000)
    assert st.sm.array.shape == (3, 1024) and st.exp is not None and st.full.tensor.shape == (3, 1000)
    assert st.full.u16 is not None and st.full.u16[0].shape == (1000,)
    cache.release_staging(st)
    assert b.used() == before
    with pytest.raises(BudgetTooSmallError) as err:
        cache.staging(100)
    assert err.value.minimum_bytes == before + cache.staging_nbytes(100)
