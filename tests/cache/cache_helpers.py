"""Small-expert helpers shared by the cache tests: numel 256, E slots of 64 bytes, 64-byte alignment."""

from __future__ import annotations

import numpy as np
import torch

from zipmoe.cache import ExpertCache, MemoryBudget
from zipmoe.types import ExpertKey, State

NUMEL, E_SLOT, ALIGN = 256, 64, 64


def k(i: int, layer: int = 0) -> ExpertKey:
    return ExpertKey(layer, i)


def tag(key: ExpertKey) -> int:
    return (key.layer * 37 + key.expert * 11 + 1) % 251


def sm_of(key: ExpertKey) -> np.ndarray:
    return np.full(NUMEL, tag(key), dtype=np.uint8)


def e_of(key: ExpertKey) -> np.ndarray:
    return np.full(8 + key.expert % 50, 255 - tag(key), dtype=np.uint8)


def full_of(key: ExpertKey) -> torch.Tensor:
    return torch.full((NUMEL,), float(tag(key)), dtype=torch.bfloat16)


def make(caps: dict[State, int], eviction: str = "lru", **kw) -> ExpertCache:
    budget = MemoryBudget("1MiB")
    return ExpertCache(budget, NUMEL, E_SLOT, capacities=caps, eviction=eviction, align=ALIGN, **kw)


def load(cache: ExpertCache, *keys: ExpertKey) -> None:
    """One layer: lease the keys, fill whatever the cache claims with each key's data, commit."""
    with cache.acquire(keys):
        for key in keys:
            cache.admit_copy(key, sm=sm_of(key), e=e_of(key), full=full_of(key))


def holds_right_data(cache: ExpertCache, key: ExpertKey, state: State | None = None) -> bool:
    """The planes `state` (default: the current one) promises hold this key's bytes."""
    state = cache.state(key) if state is None else state
    ok = True
    if state is State.F:
        ok &= torch.equal(cache.f_view(key), full_of(key))
    if state in (State.C, State.S):
        ok &= np.array_equal(cache.sm_view(key), sm_of(key))
    if state in (State.C, State.E):
        ok &= np.array_equal(cache.e_view(key), e_of(key))
    return bool(ok)
