"""cache/: which experts are resident and in which state (F / C / S / E / miss), under one byte budget.

    accounting.py  MemoryBudget: the one memory knob (dense weights + staging + pools)
    slabs.py       preallocated host (page-aligned, pinned for CUDA) and device slabs
    pools.py       bytes per entry, capacities, the default split
    policy.py      eviction (LRU / LFU / FIFO / Marking) and admission/demotion (KeepAll) policies
    staging.py     read buffers and merge outputs for loads the pools do not keep
    cache.py       ExpertCache: lookup, leases, targets → fill → commit, eviction by slot ownership
    entries.py     per-expert slot ownership, Targets, Lease

One MoE layer, as the engine drives it (engine thread; loaders write into the views it is handed):

    with cache.acquire(needed) as lease:                # pins + looks up; lease.states[i] is F/C/S/E/MISS
        for key, st in zip(needed, lease.states):
            if st is State.F:
                w = cache.f_view(key)                   # compute directly; no targets/commit needed
                continue
            t = cache.targets(key)                      # claims slots (evicting unleased experts)
            # read SM  into t.sm  (or a staging slot if None) unless st in (C, S): cache.sm_view(key)
            # read E   into t.e   (or staging)            unless st in (C, E): cache.e_view(key)
            # merge    into t.full / t.full_u16 (or staging.full) and compute from it
            cache.commit(key, e_nbytes=region_bytes)    # on failure: cache.abort(key) (or just leave)
"""

from zipmoe.cache.accounting import MemoryBudget
from zipmoe.cache.cache import ExpertCache, Lease, Targets
from zipmoe.cache.policy import FIFO, LFU, LRU, AdmissionPolicy, Decision, EvictionPolicy, KeepAll, Marking
from zipmoe.cache.pools import capacities_from_bytes, default_capacities, entry_bytes, uniform_numel
from zipmoe.cache.staging import Staging

__all__ = [
    "FIFO", "LFU", "LRU", "AdmissionPolicy", "Decision", "EvictionPolicy", "ExpertCache", "KeepAll", "Lease",
    "Marking", "MemoryBudget", "Staging", "Targets", "capacities_from_bytes", "default_capacities", "entry_bytes",
    "uniform_numel",
]
