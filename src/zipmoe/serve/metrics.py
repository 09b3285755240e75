"""Prometheus metrics for `zipmoe serve`: request timings and tokens, plus the engine's cache counters.

Request metrics are recorded by the engine thread when a request ends; the engine's counters (hits per
state, bytes read, I/O-stall share) and the batching counters (experts requested vs loaded) are read
from stats functions at scrape time. Each server owns its registry, so several servers (or tests) in
one process do not collide.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("zipmoe.serve")

_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _SnapshotCollector(Collector):
    """Metric families from one stats snapshot per scrape; nothing when there is no snapshot function
    (a plain HF model, no batching) or it fails: a scrape must never take the server down."""

    def __init__(self, snapshot_fn: Callable[[], dict] | None):
        self.snapshot_fn = snapshot_fn

    def collect(self):
        if self.snapshot_fn is None:
            return
        try:
            stats = self.snapshot_fn()
        except Exception:
            log.exception("%s: stats unavailable", type(self).__name__)
            return
        yield from self.families(stats)

    def families(self, stats: dict):
        raise NotImplementedError


class _EngineCollector(_SnapshotCollector):
    """The engine's counters."""

    def families(self, stats: dict):
        hits = CounterMetricFamily("zipmoe_expert_hits", "Experts served, by the cache state they were in",
                                   labels=["state"])
        for state, count in sorted(dict(stats.get("hits", {})).items()):
            hits.add_metric([str(state)], float(count))
        yield hits
        yield CounterMetricFamily("zipmoe_store_read_bytes", "Bytes read from the store's expert file",
                                  value=float(stats.get("bytes_read", 0)))
        yield GaugeMetricFamily("zipmoe_io_stall_share",
                                "Share of MoE layer time spent waiting for expert weights (0-1)",
                                value=float(stats.get("io_stall_share", 0.0)))


class _ShareCollector(_SnapshotCollector):
    """Batching counters from serve/shared_step.py: loads below requests are loads the rounds shared."""

    def families(self, stats: dict):
        for name, key, doc in (
            ("zipmoe_batch_rounds", "rounds", "Rounds that stepped two or more requests together"),
            ("zipmoe_batch_steps", "steps", "Request steps run in those rounds"),
            ("zipmoe_batch_expert_requests", "requested", "Experts the requests' MoE layers asked for"),
            ("zipmoe_batch_expert_loads", "loaded", "Experts the engine served for them (shared in a round)"),
        ):
            yield CounterMetricFamily(name, doc, value=float(stats.get(key, 0)))


class ServerMetrics:
    def __init__(self, stats_fn: Callable[[], dict] | None = None, share_fn: Callable[[], dict] | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("zipmoe_time_to_first_token_seconds", "Request submission to first token",
                              buckets=_TIME_BUCKETS, registry=r)
        self.tpot = Histogram("zipmoe_time_per_output_token_seconds", "Mean time per token after the first",
                              buckets=_TIME_BUCKETS, registry=r)
        self.prompt_tokens = Counter("zipmoe_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("zipmoe_completion_tokens", "Tokens generated", registry=r)
        self.requests = Counter("zipmoe_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.active = Gauge("zipmoe_requests_running", "Requests being decoded", registry=r)
        self.queued = Gauge("zipmoe_requests_waiting", "Requests waiting for a decoding slot", registry=r)
        r.register(_EngineCollector(stats_fn))
        r.register(_ShareCollector(share_fn))

    def record_finished(self, outcome: str, prompt_tokens: int, completion_tokens: int,
                        ttft_s: float | None, tpot_s: float | None) -> None:
        """outcome: 'completed', 'cancelled' (client went away) or 'error'."""
        self.requests.labels(outcome).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)
        if ttft_s is not None and completion_tokens:
            self.ttft.observe(ttft_s)
        if tpot_s is not None and completion_tokens > 1:
            self.tpot.observe(tpot_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
