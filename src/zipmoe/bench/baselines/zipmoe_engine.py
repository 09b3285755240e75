"""System "zipmoe": our engine over the compressed (Huffman) store, default pool split, LRU.

bench stage. Loads with zipmoe.load under the run's budget; reads use O_DIRECT, so the page cache
never holds experts the budget excludes. Counters come from the engine's own stats (bytes read,
decode work, stalls, hits per cache state). Also holds store_geometry(), which sizes budgets the
same way load() does, so every system of a comparison gets the same total bytes.
Sizes in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zipmoe.bench.baselines.base import Budget, HFSystem, Setup
from zipmoe.bench.metrics import os_read_bytes, trace_summary
from zipmoe.cache import entry_bytes
from zipmoe.cache.staging import staging_nbytes
from zipmoe.models.load import _top_k, load, unload
from zipmoe.store.reader import StoreReader
from zipmoe.types import State

_STATS = ("bytes_read", "decode_s", "io_busy_s", "stall_s", "layer_s")


def store_geometry(store: str | Path, device: str) -> dict[str, int]:
    """Bytes load() will reserve for dense weights and staging, and the experts' BF16/stored bytes."""
    with StoreReader(store) as r:
        entries = list(r.entries.values())
        numel = entries[0].numel
        dense = sum(p.stat().st_size for p in r.dense_files(verify=False))
        n_experts = len({e.key.expert for e in entries})
        slots = max(1, min(n_experts, 2 * _top_k(r.config)))
        per = entry_bytes(numel, r.max_e_region_bytes)
        staging = staging_nbytes(slots, numel, per[State.S], per[State.E], exp=True)
        staging += slots * 2 * numel if device.startswith("cuda") else 0
        return {"dense": dense, "staging": staging, "numel": numel, "entries": len(entries),
                "expert_bf16": len(entries) * numel * 2, "expert_stored": r.expert_bytes.stored}


@dataclass
class ZipMoESystem(HFSystem):
    name: str = "zipmoe"
    label: str = "zipmoe"
    page_cache: str = "O_DIRECT"
    coder: str = "huffman"  # which converted store it serves
    eviction: str | None = None  # None: load()'s default
    late_merge: bool | None = None  # load(late_merge=...); None: its default (on for CUDA)

    def _capacities(self, setup: Setup, budget: Budget) -> dict[State, int] | None:
        return None  # the engine's default pool split

    def _load(self, setup: Setup, budget: Budget) -> torch.nn.Module:
        model = load(setup.stores[self.coder], device=setup.device, memory_budget=budget.nbytes,
                     workers=setup.workers, capacities=self._capacities(setup, budget),
                     experts_implementation=setup.experts_implementation, late_merge=self.late_merge,
                     **({"eviction": self.eviction} if self.eviction else {}))
        engine = model.zipmoe_engine
        if not engine.reader.direct:
            self.page_cache = "buffered (O_DIRECT unsupported here: page cache may hold experts)"
        self.info = {"store": setup.stores[self.coder], "direct_io": bool(engine.reader.direct),
                     "pools": {s.name: n for s, n in getattr(engine.cache, "capacity", {}).items()}}
        return model

    def run(self, prompts: list, new_tokens: int, deadline: float | None = None) -> dict[str, Any]:
        """The base run, plus where its decode steps went (Engine.trace, bench/metrics.py)."""
        engine = self.model.zipmoe_engine
        engine.trace = []
        try:
            rec = super().run(prompts, new_tokens, deadline)
            rec["merge"] = engine.merge_path
            if engine.trace:
                rec["trace"] = trace_summary(engine.trace, len({k.layer for k in engine.reader.entries}))
        finally:
            engine.trace = None
        return rec

    def _counters(self) -> dict[str, Any]:
        snap = self.model.zipmoe_engine.stats.snapshot()
        return {**{k: snap[k] for k in _STATS}, "hits": dict(snap["hits"]), "os_read_bytes": os_read_bytes()}

    def close(self) -> None:
        if self.model is not None:
            unload(self.model)
        super().close()


@dataclass
class ZipMoEFusedSystem(ZipMoESystem):
    """zipmoe with load(late_merge=False): the workers merge each expert, as before late merge became the CUDA
    default; to compare the two in one suite run."""

    name: str = "zipmoe-fused"
    label: str = "zipmoe, fused decode"
    late_merge: bool | None = False
