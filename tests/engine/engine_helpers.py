"""Budgets and inputs the engine tests (and scripts/generic_sweep.py) load stores under, and the prefetch
tests' settling and cache checks."""

from __future__ import annotations

import numpy as np
import torch

from zipmoe.store.reader import StoreReader
from zipmoe.types import State


def budgets(store) -> dict[str, int | None]:
    """everything fits / about half the experts / the minimum (pools hold ~one expert per layer)."""
    with StoreReader(store) as r:
        n = len(r.entries)
        numel = next(iter(r.entries.values())).numel
        layers = len({k.layer for k in r.entries})
        dense = sum(p.stat().st_size for p in r.dense_files())
    base = dense + 8 * numel * 6  # dense + staging (slots × (BF16 + SM + E + exp) with page padding)
    return {"all": None, "half": base + n * numel, "minimum": base + layers * numel * 2 + 3 * 4096 * layers}


def prefetch_budget(store) -> int:
    """A budget that forces misses and leaves room for the prefetcher's read-ahead slots."""
    with StoreReader(store) as r:
        numel = next(iter(r.entries.values())).numel
        layers = len({k.layer for k in r.entries})
        dense = sum(p.stat().st_size for p in r.dense_files())
    return dense + 8 * numel * 6 + 4 * numel * 8 + layers * numel


def padded_inputs(batch: int, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [batch, length], seeded by batch; row r is left-padded by r + 1 tokens."""
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, 150, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, : row + 1] = 0
        ids[row, : row + 1] = 0
    return ids, mask


def settle_prefetch(engine) -> None:
    """Let every hinted read finish before the next hint (which drops the reads still queued) and before
    its layer collects (the last MoE layer hints nothing): what is prefetched, and so what the cache holds
    afterwards, then no longer depends on thread timing, and the prefetched-decode path is met on every run,
    not on lucky ones (full-suite runs met it 0 times, about one in eight)."""
    prefetcher, hint, collect = engine.prefetcher, engine.hint, engine._collect

    def settled_hint(layer: int, experts: list[int]) -> None:
        assert prefetcher.wait_idle(timeout_s=30), "a prefetch read did not finish in 30 s"
        hint(layer, experts)

    def settled_collect(layer: int, keys: list) -> dict:
        assert prefetcher.wait_idle(timeout_s=30, layer=layer), f"layer {layer}'s prefetch reads did not finish"
        return collect(layer, keys)

    engine.hint, engine._collect = settled_hint, settled_collect


def assert_cache_holds_the_stored_planes(engine) -> None:
    """Planes the cache kept (prefetched experts' included, copied shard by shard by the workers) are
    byte for byte what the store holds, so later hits decode the right weights."""
    reader, cache = engine.reader, engine.cache
    sm_buf, e_buf = reader.new_sm_buffer(), reader.new_e_buffer()
    checked = 0
    for key, entry in reader.entries.items():
        state = cache.state(key)
        if state in (State.C, State.S):
            assert np.array_equal(cache.sm_view(key)[: entry.numel], reader.read_sm_into(entry, sm_buf)), key
            checked += 1
        if state in (State.C, State.E):
            held = engine._split_shards(entry, cache.e_view(key))
            for a, b in zip(held, reader.read_e_into(entry, e_buf), strict=True):
                assert np.array_equal(a, b), key
            checked += 1
    if any(cache.capacity[p] for p in (State.C, State.S, State.E)):
        assert checked > 0, "the cache has host pools but holds no planes: nothing was checked"
