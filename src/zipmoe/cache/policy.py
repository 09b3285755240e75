"""Policies: which pool member to evict (EvictionPolicy), what a loaded expert keeps (AdmissionPolicy).

Stage: the engine thread, inside ExpertCache. Pure bookkeeping on ExpertKeys: no memory, no torch.
The planner issue replaces KeepAll with a rank-range placement; LRU/LFU/FIFO/Marking/LRFU are the eviction choices.
"""

from __future__ import annotations

import random
import types
from collections import OrderedDict
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from typing import Protocol

from zipmoe.errors import ZipMoEError
from zipmoe.types import ExpertKey, State

# Planes each host state holds; the F pool is tracked separately (an expert may be in F and C at once).
HOST_PLANES: dict[State | None, frozenset[str]] = {
    State.C: frozenset({"sm", "e"}), State.S: frozenset({"sm"}), State.E: frozenset({"e"}), None: frozenset(),
}


def host_for(planes: frozenset[str] | set[str]) -> State | None:
    """The host state that holds exactly these planes."""
    for state, held in HOST_PLANES.items():
        if held == planes:
            return state
    raise AssertionError(f"no host state holds {planes}")


class EvictionPolicy(Protocol):
    """Order of eviction inside one pool. Members are ExpertKeys; pinned keys are never chosen."""

    def insert(self, key: ExpertKey) -> None:
        """`key` just became a member (counts as its first access)."""

    def touch(self, key: ExpertKey) -> None:
        """`key`, a member, was accessed."""

    def remove(self, key: ExpertKey) -> None:
        """`key` leaves the pool (evicted, demoted or moved)."""

    def victim(self, pinned: Container[ExpertKey]) -> ExpertKey | None:
        """The member to evict next, skipping pinned keys; None if every member is pinned."""

    # Optional (added after the first release): members-only defaults, inherited by subclasses (LRU, LFU,
    # FIFO, Marking) and filled in by with_defaults for duck-typed policies that lack them.
    def sized(self, capacity: int) -> None:
        """The pool holds at most `capacity` members (called once by the cache, before any access)."""
        return None

    def seen(self, key: ExpertKey) -> None:
        """`key`, not a member, was accessed (policies that remember non-members count it)."""
        return None

    def admits(self, candidate: ExpertKey, victim: ExpertKey) -> bool:
        """Whether a load of `candidate` (not a member) may evict `victim` to enter a full pool."""
        return True

    def accessed(self, tokens: Mapping[ExpertKey, float]) -> None:
        """A layer call begins: its keys are touched or seen next, `tokens` routed to each (missing: 1)."""
        return None

    def __len__(self) -> int: ...

    def __contains__(self, key: object) -> bool: ...


class LRU(EvictionPolicy):
    """Least recently used first: one OrderedDict, oldest at the front."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[ExpertKey, None] = OrderedDict()

    def insert(self, key: ExpertKey) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: ExpertKey) -> None:
        self._order.move_to_end(key)

    def remove(self, key: ExpertKey) -> None:
        del self._order[key]

    def victim(self, pinned: Container[ExpertKey]) -> ExpertKey | None:
        return next((k for k in self._order if k not in pinned), None)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order


class FIFO(LRU):
    """First in, first out: accesses do not reorder (the paper's ablation baseline)."""

    name = "fifo"

    def touch(self, key: ExpertKey) -> None:
        return None


class LFU(EvictionPolicy):
    """Least frequently used first, least recently used among equal counts; O(1) except when pinned.

    Counts start at 1 when a key enters this pool and are forgotten when it leaves (no aging).
    """

    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[ExpertKey, int] = {}
        self._buckets: dict[int, OrderedDict[ExpertKey, None]] = {}

    def _add(self, key: ExpertKey, count: int) -> None:
        self._count[key] = count
        self._buckets.setdefault(count, OrderedDict())[key] = None

    def _drop(self, key: ExpertKey) -> int:
        count = self._count.pop(key)
        bucket = self._buckets[count]
        del bucket[key]
        if not bucket:
            del self._buckets[count]
        return count

    def insert(self, key: ExpertKey) -> None:
        if key in self._count:
            self._drop(key)
        self._add(key, 1)

    def touch(self, key: ExpertKey) -> None:
        self._add(key, self._drop(key) + 1)

    def remove(self, key: ExpertKey) -> None:
        self._drop(key)

    def victim(self, pinned: Container[ExpertKey]) -> ExpertKey | None:
        for count in sorted(self._buckets):
            for key in self._buckets[count]:
                if key not in pinned:
                    return key
        return None

    def __len__(self) -> int:
        return len(self._count)

    def __contains__(self, key: object) -> bool:
        return key in self._count


class Marking(EvictionPolicy):
    """The marking algorithm (Fiat et al. 1991), one of the paper's ablation baselines: a member is marked
    when it enters or is accessed; the victim is a random unmarked member; when every unpinned member is
    marked, a new phase unmarks them all. Seeded, so a run repeats. victim() is O(members): pools hold
    hundreds of experts, and this policy exists for the ablation, not the hot path's default.
    """

    name = "marking"

    def __init__(self, seed: int = 0) -> None:
        self._marked: dict[ExpertKey, bool] = {}
        self._rng = random.Random(seed)

    def insert(self, key: ExpertKey) -> None:
        self._marked[key] = True

    def touch(self, key: ExpertKey) -> None:
        self._marked[key] = True

    def remove(self, key: ExpertKey) -> None:
        del self._marked[key]

    def victim(self, pinned: Container[ExpertKey]) -> ExpertKey | None:
        free = [k for k in self._marked if k not in pinned]
        if not free:
            return None
        unmarked = [k for k in free if not self._marked[k]]
        if not unmarked:  # a new phase
            for k in self._marked:
                self._marked[k] = False
            unmarked = free
        return self._rng.choice(unmarked)

    def __len__(self) -> int:
        return len(self._marked)

    def __contains__(self, key: object) -> bool:
        return key in self._marked


class LRFU:
    """Least recently/frequently used (Lee et al. 2001) with a frequency admission filter (as TinyLFU,
    Einziger et al. 2017): a key's score is the sum over its accesses of w·2^(-age/H), w = the tokens
    routed to it in that layer call and age counted in layer calls; scores are remembered while a key
    is out of the pool too; the victim is the unpinned member with the lowest score; a loaded key enters
    a full pool only if its score before this access beats the victim's.

    Why: the engine's pools are shared by all layers. At batch 16 each layer needs nearly every expert,
    so the access pattern is a cycle over the layers, where LRU (and plain LRFU) evict exactly what the
    next layers need and hit nothing; the admission filter keeps a stable subset instead. At batch 1
    real routing within a request is skewed and steady, which frequency captures, and a prompt's
    prefill shows which experts the request favours: token weights let it say so, and counting age in
    layer calls keeps a 60-expert prefill call from aging the earlier layers' experts by 60 accesses.
    Cache simulation on the calibrated sampler (`python -m zipmoe.bench.cachesim`, one C pool, 6 layers ×
    60 experts, 64-token prompts, BENCHMARKS.md), decode-step hit rates: 135 slots, batch 1: LRU 0.437,
    LRFU counted per access and unweighted 0.483, this 0.531; batch 16: 0.0 / 0.366 / 0.396; 270 slots:
    batch 1 0.814 → 0.835, batch 16 0.729 → 0.769. H defaults to HALF_LIFE_PER_SLOT × capacity layer calls
    (0.35–1.4 moved those rates by ≤ 1.5 points). On real text (the demo's SmolLM2 MoE, its own routers,
    short chat prompts, scripts/demo_eviction.py) it serves the same share as the per-access version
    (0.367 / 0.552 / 0.792 against 0.364 / 0.549 / 0.799 at 300 / 400 / 600 MiB). Used alone (no
    accessed() calls), every access is its own call of weight 1. Scores live at a shared exponent scale
    (weights grow as 2^(t/H)) and are renormalised before they could overflow; victim() is O(members).
    """

    name = "lrfu"
    HALF_LIFE_PER_SLOT = 0.7

    def __init__(self, half_life: float | None = None) -> None:
        self._half_life = half_life
        self._score: dict[ExpertKey, float] = {}  # every key seen, members or not
        self._latest: dict[ExpertKey, float] = {}  # weight of each key's latest access
        self._members: dict[ExpertKey, None] = {}
        self._t = 0.0  # layer calls so far (since the last renormalisation), in half-lives
        self._tokens: Mapping[ExpertKey, float] | None = None  # the current call's weights (None: no calls)
        self._version = 0  # bumped by every change: victim() reuses its answer while nothing changed
        self._memo: tuple[int, ExpertKey] | None = None

    def sized(self, capacity: int) -> None:
        if self._half_life is None:
            self._half_life = max(8.0, self.HALF_LIFE_PER_SLOT * capacity)

    def _tick(self) -> None:
        if self._half_life is None:
            self.sized(0)
        self._t += 1.0 / self._half_life
        if self._t > 512:  # 2^512 is far from float overflow; rescale every score to the present
            scale = 2.0 ** -self._t
            self._score = {k: v * scale for k, v in self._score.items() if v * scale > 1e-12 or k in self._members}
            self._latest = {k: self._latest.get(k, 0.0) * scale for k in self._score}
            self._t = 0.0

    def accessed(self, tokens: Mapping[ExpertKey, float]) -> None:
        self._tick()
        self._tokens = tokens

    def _access(self, key: ExpertKey) -> None:
        if self._tokens is None:  # used alone: each access is a call of its own
            self._tick()
            weight = 2.0 ** self._t
        else:
            weight = 2.0 ** self._t * self._tokens.get(key, 1.0)
        self._score[key] = self._score.get(key, 0.0) + weight
        self._latest[key] = weight
        self._version += 1

    def insert(self, key: ExpertKey) -> None:
        if key not in self._latest:  # not seen() before: this insert is its access
            self._access(key)
        self._members[key] = None
        self._version += 1

    def touch(self, key: ExpertKey) -> None:
        self._access(key)

    def seen(self, key: ExpertKey) -> None:
        self._access(key)

    def admits(self, candidate: ExpertKey, victim: ExpertKey) -> bool:
        before = self._score.get(candidate, 0.0) - self._latest.get(candidate, 0.0)
        return before > self._score.get(victim, 0.0)

    def remove(self, key: ExpertKey) -> None:
        del self._members[key]
        self._version += 1

    def victim(self, pinned: Container[ExpertKey]) -> ExpertKey | None:
        # One load asks up to four times (admission, room, eviction) with nothing changed in between:
        # the scan is O(members) in Python, so it runs once. A memo is never a pinned or former member.
        if self._memo is not None and self._memo[0] == self._version and self._memo[1] not in pinned:
            return self._memo[1]
        score = self._score
        best = min((k for k in self._members if k not in pinned), key=lambda k: score.get(k, 0.0), default=None)
        self._memo = (self._version, best) if best is not None else None
        return best

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, key: object) -> bool:
        return key in self._members


EVICTION_POLICIES: dict[str, Callable[[], EvictionPolicy]] = {
    "lru": LRU, "lfu": LFU, "fifo": FIFO, "marking": Marking, "lrfu": LRFU,
}


class _WithDefaults:
    """A policy written before sized/seen/admits/accessed existed, with those filled in (members-only behaviour)."""

    def __init__(self, policy: object):
        self._p = policy
        self.insert, self.touch, self.remove, self.victim = (
            policy.insert, policy.touch, policy.remove, policy.victim)  # type: ignore[attr-defined]
        for name in ("sized", "seen", "admits", "accessed"):
            setattr(self, name, getattr(policy, name, None) or types.MethodType(getattr(EvictionPolicy, name), self))

    def __len__(self) -> int:
        return len(self._p)  # type: ignore[arg-type]

    def __contains__(self, key: object) -> bool:
        return key in self._p  # type: ignore[operator]


def with_defaults(policy: object) -> EvictionPolicy:
    """`policy` itself when it has the whole protocol, else wrapped so the cache can call every method."""
    if all(callable(getattr(policy, n, None)) for n in ("sized", "seen", "admits", "accessed")):
        return policy  # type: ignore[return-value]
    return _WithDefaults(policy)  # type: ignore[return-value]


def eviction_factory(policy: str | Callable[[], EvictionPolicy]) -> Callable[[], EvictionPolicy]:
    """A factory of per-pool policies from a name ('lru', 'lfu', 'fifo', 'marking', 'lrfu') or a callable."""
    if callable(policy):
        return policy
    if policy not in EVICTION_POLICIES:
        raise ZipMoEError(f"unknown eviction policy {policy!r}; choose one of {sorted(EVICTION_POLICIES)}")
    return EVICTION_POLICIES[policy]


@dataclass(frozen=True, slots=True)
class Decision:
    """What to keep of an expert that is being loaded for a layer."""

    full: bool  # keep the merged BF16 expert in the F pool
    host: State | None  # host planes to hold afterwards: C, S, E or None (planes it already holds are kept)


class AdmissionPolicy(Protocol):
    """Decides what a loaded expert keeps and what an evicted host entry is demoted to."""

    def decide(self, key: ExpertKey, state: State, capacity: Mapping[State, int]) -> Decision:
        """`key` is being loaded from `state` (C, S, E or MISS); every missing plane will be in memory."""

    def demote(self, host: State, capacity: Mapping[State, int]) -> State | None:
        """Host state for an entry evicted from pool `host`; must hold a strict subset of its planes."""


@dataclass(frozen=True, slots=True)
class KeepAll:
    """Default until the planner lands: keep everything there is room for, demote C before dropping.

    A loaded expert goes to F (if F has slots) and, when `inclusive`, also keeps its planes in C, so an
    F eviction only drops the BF16 copy and the expert stays a C hit. Without C slots it keeps what
    the S or E pool can hold. C victims fall to S (SM kept, E slot freed) if S has slots, else to E,
    else out; S and E victims drop out.
    """

    inclusive: bool = True  # F experts also hold host planes (costs bytes, saves re-reads after F eviction)

    def decide(self, key: ExpertKey, state: State, capacity: Mapping[State, int]) -> Decision:
        full = capacity[State.F] > 0
        if full and not self.inclusive:
            return Decision(full=True, host=None)
        for host in (State.C, State.S, State.E):
            if capacity[host] > 0:
                return Decision(full=full, host=host)
        return Decision(full=full, host=None)

    def demote(self, host: State, capacity: Mapping[State, int]) -> State | None:
        if host is State.C:
            if capacity[State.S] > 0:
                return State.S
            if capacity[State.E] > 0:
                return State.E
        return None
