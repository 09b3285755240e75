"""State transitions of ExpertCache: admission, promotion, demotion by slot ownership, leases."""

import numpy as np
import pytest
import torch
from cache_helpers import E_SLOT, NUMEL, e_of, full_of, holds_right_data, k, load, make, sm_of

from zipmoe.cache import KeepAll
from zipmoe.errors import ZipMoEError
from zipmoe.types import State

F, C, S, E, MISS = State.F, State.C, State.S, State.E, State.MISS


def test_miss_is_admitted_to_f_and_c_and_f_eviction_keeps_c() -> None:
    cache = make({F: 1, C: 2})
    assert cache.state(k(0)) is MISS
    load(cache, k(0))
    assert cache.state(k(0)) is F and holds_right_data(cache, k(0))
    assert holds_right_data(cache, k(0), C)  # inclusive: its planes are held too
    load(cache, k(1))
    assert cache.state(k(1)) is F and cache.state(k(0)) is C
    assert holds_right_data(cache, k(0)) and holds_right_data(cache, k(1))
    assert cache.occupancy() == {F: 1, C: 2, S: 0, E: 0}
    cache.check_invariants()


def test_c_hit_merges_into_an_f_slot_and_loads_nothing_else() -> None:
    cache = make({F: 1, C: 2})
    load(cache, k(0))
    load(cache, k(1))  # k0 now C
    with cache.acquire([k(0)]) as lease:
        assert lease.states == [C]
        t = cache.targets(k(0))
        assert t.sm is None and t.e is None and t.full is not None and t.full_u16 is not None
        assert cache.state(k(0)) is C  # pending claims are not visible to lookups
        t.full_u16[:] = full_of(k(0)).view(torch.int16).numpy().view(np.uint16)
        cache.commit(k(0))
    assert cache.state(k(0)) is F and holds_right_data(cache, k(0))
    assert cache.state(k(1)) is C


def test_c_victim_is_demoted_to_s_keeping_its_sm_slot() -> None:
    cache = make({C: 1, S: 1})
    load(cache, k(0))
    sm_ptr = cache.sm_view(k(0)).ctypes.data
    load(cache, k(1))
    assert cache.state(k(0)) is S and cache.state(k(1)) is C
    assert cache.sm_view(k(0)).ctypes.data == sm_ptr and holds_right_data(cache, k(0))
    with pytest.raises(ZipMoEError, match="no e slot"):
        cache.e_view(k(0))
    load(cache, k(2))  # k1 -> S, and S's LRU victim k0 drops out
    assert [cache.state(k(i)) for i in range(3)] == [MISS, S, C]
    assert cache.counters["demote.C->S"] == 2 and cache.counters["evict.S"] == 1
    cache.check_invariants()


def test_c_victim_falls_to_e_when_there_is_no_s_pool() -> None:
    cache = make({C: 1, E: 1})
    load(cache, k(3))
    load(cache, k(4))
    assert cache.state(k(3)) is E and holds_right_data(cache, k(3))
    assert cache.e_view(k(3)).nbytes == e_of(k(3)).nbytes


def test_s_hit_reads_e_into_a_slot_and_becomes_c() -> None:
    cache = make({C: 1, S: 1})
    load(cache, k(0))
    load(cache, k(1))  # k0: S, k1: C
    sm_ptr = cache.sm_view(k(0)).ctypes.data
    with cache.acquire([k(0)]) as lease:
        assert lease.states == [S]
        t = cache.targets(k(0))
        assert t.sm is None and t.full is None and t.e is not None and t.e.nbytes == E_SLOT
        assert holds_right_data(cache, k(0), S)  # the SM it merges from is untouched by the claim
        t.e[: e_of(k(0)).nbytes] = e_of(k(0))
        cache.commit(k(0), e_nbytes=e_of(k(0)).nbytes)
    assert cache.state(k(0)) is C and cache.state(k(1)) is S  # k1 demoted into the S place k0 left
    assert cache.sm_view(k(0)).ctypes.data == sm_ptr
    assert holds_right_data(cache, k(0)) and holds_right_data(cache, k(1))
    cache.check_invariants()


def test_e_hit_reads_sm_into_a_slot_and_becomes_c() -> None:
    cache = make({C: 1, E: 1})
    load(cache, k(0))
    load(cache, k(1))  # k0: E
    with cache.acquire([k(0)]) as lease:
        assert lease.states == [E]
        t = cache.targets(k(0))
        assert t.e is None and t.sm is not None
    load(cache, k(0))  # the lease above aborted its claim; this one fills it
    assert cache.state(k(0)) is C and cache.state(k(1)) is E
    assert holds_right_data(cache, k(0)) and holds_right_data(cache, k(1))


def test_leased_experts_are_never_evicted() -> None:
    cache = make({F: 1, C: 1})
    with cache.acquire([k(0), k(1)]) as lease:
        assert lease.states == [MISS, MISS]
        t0, t1 = cache.targets(k(0)), cache.targets(k(1))
        assert t0.full is not None and t0.sm is not None and t0.e is not None
        assert (t1.full, t1.sm, t1.e) == (None, None, None)  # every slot is held by leased k0: use staging
        cache.admit_copy(k(0), sm=sm_of(k(0)), e=e_of(k(0)), full=full_of(k(0)))
    with cache.acquire([k(0)]):
        load(cache, k(1), k(2))
        assert cache.state(k(0)) is F and holds_right_data(cache, k(0))
    load(cache, k(1))
    assert cache.state(k(1)) is F and cache.state(k(0)) is MISS


def test_uncommitted_claims_are_aborted_when_the_lease_ends() -> None:
    cache = make({C: 1, S: 1})
    load(cache, k(0))
    load(cache, k(1))  # k0: S
    with cache.acquire([k(0), k(5)]):
        cache.targets(k(0))
        cache.targets(k(5))  # C holds leased k0 now: k5 gets no slot
    # k0 keeps its claimed (empty) E slot and stays a C member, but looks up as S; k1 fell to S
    assert [cache.state(k(i)) for i in (0, 1, 5)] == [S, S, MISS]
    assert holds_right_data(cache, k(0)) and holds_right_data(cache, k(1))
    with cache.acquire([k(0)]):
        assert cache.targets(k(0)).e is not None  # the next load refills the same claim
    cache.check_invariants()
    cache.check_invariants()


def test_exclusive_admission_keeps_no_planes_for_f() -> None:
    cache = make({F: 1, C: 2}, admission=KeepAll(inclusive=False))
    load(cache, k(0))
    assert cache.occupancy()[C] == 0
    load(cache, k(1))
    assert cache.state(k(0)) is MISS


@pytest.mark.parametrize(("eviction", "evicted"), [("lru", 0), ("lfu", 1), ("fifo", 0)])
def test_eviction_policy_picks_the_victim(eviction: str, evicted: int) -> None:
    cache = make({C: 2}, eviction=eviction)
    load(cache, k(0))
    load(cache, k(1))
    for _ in range(2):
        load(cache, k(0))
    load(cache, k(1))  # k0: 3 accesses, k1: 2 and the most recent
    load(cache, k(2))  # LRU evicts k0 (older), LFU k1 (rarer), FIFO k0 (inserted first)
    assert cache.state(k(evicted)) is MISS
    assert cache.state(k(2)) is C


def test_misuse_is_reported() -> None:
    cache = make({F: 1, C: 1})
    with pytest.raises(ZipMoEError, match="leased"):
        cache.targets(k(0))
    with pytest.raises(ZipMoEError, match="no f slot"):
        cache.f_view(k(0))
    with pytest.raises(ZipMoEError, match="not pinned"):
        cache.unpin(k(0))
    with cache.acquire([k(0)]):
        with pytest.raises(ZipMoEError, match="SM plane of 10 bytes"):
            cache.admit_copy(k(0), sm=np.zeros(10, np.uint8), e=e_of(k(0)), full=full_of(k(0)))
        assert cache.state(k(0)) is MISS
        with pytest.raises(ZipMoEError, match="full expert"):
            cache.admit_copy(k(0), sm=sm_of(k(0)), e=e_of(k(0)), full=torch.zeros(3))
        with pytest.raises(ZipMoEError, match="exponent region of 65 bytes"):
            cache.admit_copy(k(0), sm=sm_of(k(0)), e=np.zeros(E_SLOT + 1, np.uint8), full=full_of(k(0)))
        cache.targets(k(0))
        with pytest.raises(ZipMoEError, match="does not fit"):
            cache.commit(k(0), e_nbytes=10**6)
    cache.check_invariants()


def test_in_place_loads_copy_nothing() -> None:
    cache = make({F: 1, C: 1})
    with cache.acquire([k(0)]):
        t = cache.targets(k(0))
        t.sm[:NUMEL] = sm_of(k(0))
        t.e[:8] = e_of(k(0))
        t.full.copy_(full_of(k(0)))
        cache.admit_copy(k(0), sm=t.sm[:NUMEL], e=t.e[:8], full=t.full)  # same memory: recognised
    assert cache.state(k(0)) is F and cache.e_view(k(0)).nbytes == 8
    assert np.array_equal(cache.sm_view(k(0)), sm_of(k(0)))


def test_commit_only_commits_what_targets_handed_out() -> None:
    cache = make({C: 1})
    with cache.acquire([k(0)]):
        cache.targets(k(0))
        cache.abort(k(0))  # the load failed: the claimed C slots stay empty
        cache.commit(k(0))  # nothing was handed out since the abort: nothing becomes visible
        assert cache.state(k(0)) is MISS
    with cache.acquire([k(0)]):
        cache.commit(k(0))  # no targets() in this lease: still nothing
        assert cache.state(k(0)) is MISS
    load(cache, k(0))
    assert cache.state(k(0)) is C and holds_right_data(cache, k(0))
