"""Planned pools for one engine: routing statistics + profiled costs → pool capacities (and admission).

Arrow: planner (pure numerics) → here (owns the statistics, the current PoolPlan and a planning
thread) → cache (capacities at construction, PlannedAdmission per load). The compute thread calls
`observe` once per MoE layer call; every `replan_every` calls it takes a snapshot and, when the rank
curves drifted past the threshold, a background thread computes a new plan with the same pool totals
and swaps it in. Nothing here changes what is computed: only which experts stay cached.
Sizes in bytes, times in seconds.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

from zipmoe.planner import PoolPlan, RoutingStats, needs_replan, plan, replan
from zipmoe.planner.admission import PlannedAdmission
from zipmoe.planner.cost_model import profile_machine, store_geometry
from zipmoe.planner.profile_io import load_stats, profile_curves, save_stats, stats_path, store_fingerprint
from zipmoe.planner.stats import batch_curves, seed_from_curves
from zipmoe.scheduler.tasks import CostModel
from zipmoe.store.reader import StoreReader

log = logging.getLogger("zipmoe.engine")

PRIOR = "qwen1.5-moe-a2.7b"  # routing skew assumed before any statistics exist (real measured curves)


class PlannedPools:
    """Statistics, plan and admission policy of one loaded store (see module docstring)."""

    def __init__(self, reader: StoreReader, device: str, workers: int, top_k: int, pool_budget: int,
                 replan_every: int = 256, drift_threshold: float = 0.1, rank_admission: bool = False,
                 batch: int = 1, late_merge: bool = False):
        store = reader.path
        self._path, self._fingerprint = stats_path(store), store_fingerprint(store)
        entries = reader.entries
        layers = sorted({k.layer for k in entries})
        experts = len({k.expert for k in entries})
        # batch: requests decoded together. A layer call then needs the union of that many requests'
        # experts: the statistics observe exactly that (each call's share of experts), so only the prior
        # is turned into union curves (stats.batch_curves); calls of varying size are priced by the bound
        # model. Statistics are persisted with the batch size they were observed at, and reused only for it.
        self.top_k, self.workers, self.batch, self.late_merge = top_k, workers, batch, late_merge  # as the engine runs
        self._per_call = top_k if batch == 1 else None
        self.geometry = store_geometry(reader)
        self.profile = profile_machine(store, device, read_stripes=reader.read_stripes)
        self.costs: CostModel = self.profile.cost_model()
        stats = load_stats(self._path, self._fingerprint, layers, experts, batch=batch)
        if stats is None:
            stats = RoutingStats(layers, experts)
            prior = profile_curves(PRIOR, len(layers), experts, top_k=top_k)
            seed_from_curves(stats, batch_curves(prior, batch))
        self.stats = stats
        self.plan: PoolPlan = plan(stats.snapshot(), self.geometry, self.costs, workers, pool_budget,
                                   per_call=self._per_call, late_merge=late_merge)
        # Which experts fill the pools: by default the cache's recency policy (LRU) inside the planned
        # capacities, because routing skew is mostly within a request (a new prompt permutes which
        # experts are hot; ../data/routing_profiles.json: top 25 % take 63 % within a prompt, 34 %
        # across prompts), so decayed global ranks lag behind. rank_admission=True follows the plan's
        # per-layer rank ranges instead (the paper's layout; right when popularity is global).
        self.admission = PlannedAdmission(self.plan, stats) if rank_admission else None
        self.replan_every, self.drift_threshold = replan_every, drift_threshold
        self.replans = 0  # plans swapped in after the first
        self._calls = 0
        self._pending: Future | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="zipmoe-planner")
        log.info("planned pools: %s", self.plan.describe())

    def observe(self, layer: int, needed: list[int]) -> None:
        """Count one MoE layer call; a prefill-sized call counts as one decode step's worth."""
        self.stats.observe(layer, needed, weight=min(1.0, self.top_k / max(1, len(needed))))
        self._calls += 1
        if self._calls % self.replan_every == 0:
            self.maybe_replan()

    def maybe_replan(self) -> None:
        """Start a background re-plan when the curves drifted and none is running."""
        if self._pending is not None and not self._pending.done():
            return
        snapshot = self.stats.snapshot()
        if needs_replan(self.plan, snapshot, self.drift_threshold):
            self._pending = self._thread.submit(self._replan, snapshot)
            self._pending.add_done_callback(_log_failure)

    def _replan(self, snapshot) -> None:
        new = replan(self.plan, snapshot, self.geometry, self.costs, self.workers, per_call=self._per_call,
                     late_merge=self.late_merge)
        self.plan = new
        if self.admission is not None:
            self.admission.set_plan(new)
        self.replans += 1
        log.debug("re-planned pools: %s", new.describe())

    def close(self) -> None:
        """Finish a running re-plan and persist the statistics next to the store (best effort)."""
        self._thread.shutdown(wait=True)
        save_stats(self.stats, self._path, self._fingerprint, self.batch)  # warns itself when the disk refuses


def _log_failure(done: Future) -> None:
    """A failed re-plan keeps the old plan (outputs never depend on it) but must not pass unnoticed."""
    if not done.cancelled() and done.exception() is not None:
        log.warning("re-planning the expert pools failed; keeping the current plan: %r", done.exception())
