"""Counters shared by the engine, the server's /metrics and the benchmarks (one source of truth).

Written by the compute thread (the executor reports its timings through the Plan it ran), except the
read counters, which the I/O threads update under the engine's I/O lock; readers take a `snapshot()`
(a plain dict) and subtract snapshots for per-request numbers.
Times in seconds, sizes in bytes.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from zipmoe.types import State

log = logging.getLogger("zipmoe.engine")


@dataclass
class EngineStats:
    hits: dict[str, int] = field(default_factory=lambda: {s.name: 0 for s in State})  # experts served per state
    bytes_read: int = 0  # bytes read from the store's data file by the executor's I/O thread
    prefetch_bytes_read: int = 0  # bytes the prefetch thread read (updated by the compute thread)
    sm_bytes_read: int = 0
    e_bytes_read: int = 0
    decode_s: float = 0.0  # summed worker time spent decoding exponent shards (+ fused merge)
    io_busy_s: float = 0.0  # time spent in reads, summed over the I/O threads (can exceed wall time)
    stall_s: float = 0.0  # compute thread waiting for weights (I/O-stall + decode-stall)
    layer_s: float = 0.0  # wall time inside MoE expert layers
    layers: int = 0  # MoE layer calls served
    steps: int = 0  # model forward calls
    step_s: list[float] = field(default_factory=list)  # wall time of each forward (recent window)
    step_tokens: list[int] = field(default_factory=list)  # query length of each forward

    def record_step(self, seconds: float, query_len: int) -> None:
        self.steps += 1
        self.step_s.append(seconds)
        self.step_tokens.append(query_len)
        if len(self.step_s) > 4096:  # bounded: keep the recent window
            del self.step_s[:2048], self.step_tokens[:2048]
        log.debug("step %d: %.4f s for %d query tokens", self.steps, seconds, query_len)

    def snapshot(self) -> dict:
        """A plain dict of every counter, plus derived ratios (hit rate, stall share)."""
        served = sum(self.hits.values())
        return {
            "hits": dict(self.hits),
            "experts_served": served,
            "hit_rate": {k: (v / served if served else 0.0) for k, v in self.hits.items()},
            "bytes_read": self.bytes_read + self.prefetch_bytes_read,
            "prefetch_bytes_read": self.prefetch_bytes_read,
            "sm_bytes_read": self.sm_bytes_read,
            "e_bytes_read": self.e_bytes_read,
            "decode_s": self.decode_s,
            "io_busy_s": self.io_busy_s,
            "stall_s": self.stall_s,
            "layer_s": self.layer_s,
            "io_stall_share": self.stall_s / self.layer_s if self.layer_s else 0.0,
            "layers": self.layers,
            "steps": self.steps,
        }


_STEP_INPUTS = ("decoder_input_ids", "input_ids", "decoder_inputs_embeds", "inputs_embeds")  # first present wins


class StepClock:
    """Times each model forward via hooks: a pre-hook starts the clock, a post-hook records it.

    The start is kept per thread: the server runs the forwards of a batched round on one thread per
    request, at the same time (serve/shared_step.py)."""

    def __init__(self, stats: EngineStats):
        self.stats = stats
        self._local = threading.local()
        self._lock = threading.Lock()

    def pre(self, module, args, kwargs) -> None:
        # an encoder-decoder model's steps are its decoder's (generate() runs the encoder once, before them,
        # outside this forward: its time is in no step)
        ids = next((kwargs[k] for k in _STEP_INPUTS if kwargs.get(k) is not None), args[0] if args else None)
        self._local.query_len = int(ids.shape[1]) if ids is not None and ids.dim() >= 2 else 0
        self._local.t0 = time.perf_counter()

    def post(self, module, args, kwargs, output) -> None:
        seconds = time.perf_counter() - self._local.t0
        with self._lock:
            self.stats.record_step(seconds, self._local.query_len)
