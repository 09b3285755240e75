"""Eviction order of LRU, LFU, FIFO, Marking and LRFU, with pinned keys skipped."""

import pytest
from tests.cache.cache_helpers import holds_right_data, load, make

from zipmoe.cache.policy import FIFO, LFU, LRFU, LRU, EvictionPolicy, Marking, eviction_factory
from zipmoe.errors import ZipMoEError
from zipmoe.types import ExpertKey, State


def k(i: int) -> ExpertKey:
    return ExpertKey(0, i)


def drain(policy, pinned=frozenset()) -> list[int]:
    order = []
    while (v := policy.victim(pinned)) is not None:
        order.append(v.expert)
        policy.remove(v)
    return order


def test_lru_evicts_least_recently_used() -> None:
    p = LRU()
    for i in range(4):
        p.insert(k(i))
    p.touch(k(0))
    p.touch(k(2))
    assert drain(p) == [1, 3, 0, 2]


def test_fifo_ignores_accesses() -> None:
    p = FIFO()
    for i in range(4):
        p.insert(k(i))
    p.touch(k(0))
    p.touch(k(0))
    assert drain(p) == [0, 1, 2, 3]


def test_lfu_evicts_least_frequent_then_least_recent() -> None:
    p = LFU()
    for i in range(4):
        p.insert(k(i))
    for i, n in ((0, 3), (1, 1), (2, 3), (3, 0)):
        for _ in range(n):
            p.touch(k(i))
    # counts: 0→4, 1→2, 2→4, 3→1; ties by recency (0 reached 4 before 2)
    assert drain(p) == [3, 1, 0, 2]


def test_lfu_reinsert_resets_count() -> None:
    p = LFU()
    p.insert(k(0))
    p.insert(k(1))
    p.touch(k(0))
    p.remove(k(0))
    p.insert(k(0))
    assert drain(p) == [1, 0]


@pytest.mark.parametrize("cls", [LRU, LFU, FIFO, Marking, LRFU])
def test_pinned_keys_are_skipped(cls) -> None:
    p = cls()
    for i in range(3):
        p.insert(k(i))
    pinned = {k(0), k(1)}
    assert p.victim(pinned) == k(2)
    p.remove(k(2))
    assert p.victim(pinned) is None
    assert len(p) == 2 and k(0) in p and k(2) not in p


def test_marking_evicts_unmarked_first_and_starts_a_new_phase() -> None:
    p = Marking(seed=1)
    for i in range(4):
        p.insert(k(i))  # every member marked: the first victim starts a new phase (all unmarked)
    first = p.victim(set())
    assert first in {k(i) for i in range(4)}
    p.remove(first)
    survivors = [k(i) for i in range(4) if k(i) != first]
    p.touch(survivors[0])  # marked in the new phase: never chosen while unmarked members remain
    for _ in range(2):
        v = p.victim(set())
        assert v != survivors[0] and v in survivors
        p.remove(v)
    assert p.victim(set()) == survivors[0]  # only the marked one is left: a new phase picks it
    assert p.victim({survivors[0]}) is None


def test_factory_names() -> None:
    assert isinstance(eviction_factory("lfu")(), LFU)
    assert isinstance(eviction_factory("marking")(), Marking)
    assert isinstance(eviction_factory("lrfu")(), LRFU)
    with pytest.raises(ZipMoEError, match="unknown eviction policy"):
        eviction_factory("mru")


def test_lrfu_keeps_the_frequent_key_that_lru_would_evict() -> None:
    lrfu, lru = LRFU(half_life=20), LRU()
    for p in (lrfu, lru):
        p.insert(k(0))
        for _ in range(5):
            p.touch(k(0))  # k0: six accesses, then two one-off keys
        p.insert(k(1))
        p.insert(k(2))
    assert lru.victim(set()) == k(0)
    assert lrfu.victim(set()) == k(1)


def test_lrfu_remembers_evicted_keys_and_forgets_with_age() -> None:
    p = LRFU(half_life=2)
    p.insert(k(0))
    p.touch(k(0))
    p.remove(k(0))  # evicted, but its score is kept: back in, it outranks a newcomer
    p.insert(k(0))
    p.insert(k(1))
    assert p.victim(set()) == k(1)
    for _ in range(20):  # many half-lives of k1-only traffic: k0's history has decayed away
        p.touch(k(1))
    assert p.victim(set()) == k(0)


def test_lrfu_renormalises_without_changing_the_order() -> None:
    p = LRFU(half_life=0.01)  # 100 half-lives per access: overflow guard runs every few accesses
    p.insert(k(0))
    p.insert(k(1))
    for _ in range(50):
        p.touch(k(1))
        p.touch(k(0))
    assert p.victim(set()) == k(1)  # k0 was touched last
    p.sized(100)  # an explicit half-life is kept
    assert p._half_life == 0.01


def test_lrfu_half_life_follows_the_pool_capacity() -> None:
    p = LRFU()
    p.sized(100)
    assert p._half_life == LRFU.HALF_LIFE_PER_SLOT * 100


def _cyclic_hits(eviction: str) -> tuple[int, int]:
    """Layers 0..3 each need all 4 of their experts, over and over (batch-16 decoding); 6 C slots."""
    cache = make({State.C: 6}, eviction=eviction)
    hits = seen = 0
    for rnd in range(6):
        for layer in range(4):
            keys = [ExpertKey(layer, e) for e in range(4)]
            if rnd >= 2:  # after warm-up
                states = [cache.state(key) for key in keys]
                hits += sum(s is State.C for s in states)
                seen += len(keys)
            load(cache, *keys)
            assert all(holds_right_data(cache, key) for key in keys if cache.state(key) is State.C)
    return hits, seen


def test_lrfu_admission_keeps_a_stable_subset_of_a_cycle_that_lru_thrashes() -> None:
    lru_hits, seen = _cyclic_hits("lru")
    lrfu_hits, _ = _cyclic_hits("lrfu")
    assert lru_hits == 0  # LRU evicts exactly what the next layer needs
    assert lrfu_hits >= seen * 4 // 16  # most of the 6 slots keep hitting every round


class _LegacyLRU:
    """A user policy written against the first protocol (six methods, no sized/seen/admits)."""

    def __init__(self) -> None:
        self.order: list[ExpertKey] = []

    def insert(self, key: ExpertKey) -> None:
        self.order.append(key)

    def touch(self, key: ExpertKey) -> None:
        self.order.remove(key)
        self.order.append(key)

    def remove(self, key: ExpertKey) -> None:
        self.order.remove(key)

    def victim(self, pinned) -> ExpertKey | None:
        return next((key for key in self.order if key not in pinned), None)

    def __len__(self) -> int:
        return len(self.order)

    def __contains__(self, key: object) -> bool:
        return key in self.order


class _SubclassedLRU(_LegacyLRU, EvictionPolicy):
    """The same, declared as an explicit EvictionPolicy subclass (inherits the protocol's defaults)."""


@pytest.mark.parametrize("cls", [_LegacyLRU, _SubclassedLRU])
def test_a_policy_from_the_first_protocol_still_evicts(cls) -> None:
    cache = make({State.F: 2}, eviction=cls)
    for i in range(6):
        load(cache, k(i))
    assert [i for i in range(6) if cache.state(k(i)) is State.F] == [4, 5]  # not frozen at [0, 1]


def test_lrfu_never_reuses_a_victim_that_got_pinned() -> None:
    p = LRFU(half_life=10)
    for i in range(3):
        p.insert(k(i))
    first = p.victim(set())
    assert p.victim(set()) == first  # nothing changed: the memo answers
    assert p.victim({first}) not in (first, None)


def test_lrfu_counts_age_in_layer_calls_and_weighs_accesses_by_tokens() -> None:
    p = LRFU(half_life=4)
    p.accessed({})  # one call touching 60 keys: none of them is older than another
    for e in range(60):
        p.insert(k(e))
    assert len({round(p._score[k(e)], 12) for e in range(60)}) == 1
    p.accessed({k(60): 9.0, k(61): 1.0})  # a prefill-sized call: k60 had 9 tokens routed to it, k61 one
    p.insert(k(60))
    p.insert(k(61))
    p.accessed({})
    assert p.victim(set()) not in (k(60), k(61)), "the newer call's keys outrank the older call's"
    for e in range(60):
        p.remove(k(e))
    assert p.victim(set()) == k(61)  # same call, fewer tokens


def test_the_cache_passes_each_layer_calls_token_counts_to_its_policies() -> None:
    from zipmoe.cache import ExpertCache, MemoryBudget
    from zipmoe.types import State

    calls: list[dict] = []

    class Spy(LRU):
        def accessed(self, tokens):
            calls.append(dict(tokens))

    cache = ExpertCache(MemoryBudget(1 << 24), 64, 64, "cpu", capacities={State.C: 4}, eviction=Spy)
    with cache.acquire([k(1), k(2)], tokens=[7, 1]):
        pass
    with cache.acquire([k(3)]):
        pass
    assert calls == [{k(1): 7, k(2): 1}, {}]  # one call per acquire, for the one live pool
