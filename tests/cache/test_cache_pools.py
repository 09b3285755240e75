"""Pool geometry and the default split."""

import pytest

from zipmoe.cache import ExpertCache, MemoryBudget, default_capacities, entry_bytes, uniform_numel
from zipmoe.cache.pools import capacities_from_bytes
from zipmoe.errors import ZipMoEError
from zipmoe.types import State

F, C, S, E = State.F, State.C, State.S, State.E


def test_entry_bytes_pad_host_slots_to_the_alignment() -> None:
    assert entry_bytes(5000, 1700) == {F: 10_000, C: 8192 + 4096, S: 8192, E: 4096}
    assert entry_bytes(5000, 1700, align=1) == {F: 10_000, C: 6700, S: 5000, E: 1700}


def test_default_split_all_f_when_everything_fits() -> None:
    assert default_capacities(10 * 2000, 1000, 300, n_experts=10, align=1) == {F: 10, C: 0, S: 0, E: 0}


def test_default_split_gives_c_the_bulk_and_f_the_rest() -> None:
    caps = default_capacities(10_000, 1000, 300, n_experts=100, align=1)  # F 2000 B, C 1300 B per entry
    assert caps == {F: 0, C: 7, S: 0, E: 0}  # C: 10000 // 1300 = 7 entries; F: (10000 - 9100) // 2000
    caps = default_capacities(10_000, 1000, 300, n_experts=100, f_share=0.25, align=1)
    assert caps == {F: 1, C: 5, S: 0, E: 0}  # C: 7500 // 1300 = 5 entries; F: (10000 - 6500) // 2000
    caps = default_capacities(13_000 + 4000, 1000, 300, n_experts=10, align=1)
    assert caps[C] == 10 and caps[F] == 2  # every expert fits in C: the leftover goes to F


def test_pool_bytes_and_capacity_validation() -> None:
    per = entry_bytes(1000, 300, align=1)
    assert capacities_from_bytes({F: 4100, E: 299}, per) == {F: 2, C: 0, S: 0, E: 0}
    with pytest.raises(ZipMoEError, match=r"State\.F/C/S/E"):
        capacities_from_bytes({State.MISS: 1}, per)
    with pytest.raises(ZipMoEError, match=">= 0"):
        ExpertCache(MemoryBudget(10**6), 1000, 300, capacities={F: -1})
    with pytest.raises(ZipMoEError, match="not both"):
        ExpertCache(MemoryBudget(10**6), 1000, 300, capacities={F: 1}, pool_bytes={F: 1})


def test_cache_default_split_uses_what_the_budget_has_left() -> None:
    budget = MemoryBudget(50_000)
    budget.reserve("dense", 20_000)
    cache = ExpertCache(budget, 1000, 300, staging_slots=2, n_experts=100, align=1)
    staging = cache.staging_nbytes(2)
    assert cache.capacity == default_capacities(30_000 - staging, 1000, 300, 100, align=1)
    assert budget.used() <= budget.total
    assert set(budget.breakdown()) == {"dense", "staging.0", "pool.F", "pool.C", "pool.S", "pool.E"}


def test_uniform_numel() -> None:
    assert uniform_numel([7, 7, 7]) == 7
    with pytest.raises(ZipMoEError, match="same number of weights"):
        uniform_numel([7, 8])
