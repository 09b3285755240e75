"""Batched rounds for the server: every request computes alone, the experts are loaded once for all.

Arrow: service round → one "zipmoe-request" thread per running request runs its `Generation.step()`
(its own batch-1 forward) → at each MoE layer its experts module asks `SharedExperts.experts(layer,
needed)` → the round's driver (the service's engine thread, the only thread that iterates the engine)
waits until every request still stepping has arrived, runs the real ExpertSource once for the sorted
union and hands each yielded expert to every request that needs it, resuming the engine only when all
of them have asked for their next one (the engine may then reuse that expert's staging slot).
Each request multiplies its own tokens by the same weights at its own shapes, so its logits are
torch.equal to running it alone (`zipmoe generate`); only the loading is shared.
Threads: `Batcher.run` on the engine thread; all rendezvous state is guarded by one lock.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import torch

from zipmoe.models.base import ExpertSource
from zipmoe.models.compute import installed_source, replace_source

log = logging.getLogger("zipmoe.serve")

T = TypeVar("T")
Item = tuple[int, torch.Tensor, torch.Tensor]  # (expert, gate_up [2I,H], down [H,I]) as the source yields it


class SharedLoadError(RuntimeError):
    """Loading a shared layer's experts failed; raised in every request that was still waiting for one."""


@dataclass
class ShareStats:
    """How much loading the rounds saved (engine thread writes, anyone reads a snapshot)."""

    rounds: int = 0  # rounds that stepped two or more requests together
    steps: int = 0  # request steps run in those rounds
    layers: int = 0  # MoE layer calls the engine served (one per layer per round; alone: one per forward)
    requested: int = 0  # experts the forwards asked for, summed over requests
    loaded: int = 0  # experts the engine served for them (the union per shared layer)

    def snapshot(self) -> dict[str, float]:
        saved = self.requested - self.loaded
        return {**asdict(self), "saved": saved, "saved_share": saved / self.requested if self.requested else 0.0}


class SharedExperts:
    """An ExpertSource installed once per model in front of the engine: alone, calls pass straight
    through; on a request thread of a round, they go to that round's rendezvous."""

    def __init__(self, source: ExpertSource):
        self.source = source
        self.stats = ShareStats()
        self._local = threading.local()  # .round, .pid: set on request threads while they step
        self.hint = self._hint if getattr(source, "hint", None) is not None else None  # None: no prefetch

    @classmethod
    def install(cls, model: Any) -> SharedExperts | None:
        """Put (or find) the wrapper in front of `model`'s source; None for a model zipmoe does not serve."""
        source = installed_source(model)
        if source is None or isinstance(source, cls):
            return source
        shared = cls(source)
        replace_source(model, shared)
        return shared

    def experts(self, layer: int, needed: Sequence[int], tokens: Sequence[int] | None = None) -> Iterator[Item]:
        """ExpertSource: the engine's own generator when alone, else the round's shared one (which loads
        the union of the requests' experts, with each expert's tokens summed over them for the cache)."""
        rnd: _Round | None = getattr(self._local, "round", None)
        if rnd is None:
            self.stats.layers += 1
            self.stats.requested += len(needed)
            self.stats.loaded += len(needed)
            return self.source.experts(layer, needed, tokens)
        return rnd.experts(self._local.pid, layer, needed, tokens)

    def _hint(self, layer: int, experts: list[int]) -> None:
        rnd: _Round | None = getattr(self._local, "round", None)
        if rnd is None:
            self.source.hint(layer, experts)
        else:  # the driver passes the round's merged hint on before loading the layer
            rnd.hint(self._local.pid, layer, experts)

    def participate(self, rnd: _Round, pid: int, step: Callable[[], T]) -> T:
        """Run one request's step on this (request) thread as participant `pid` of `rnd`."""
        self._local.round, self._local.pid = rnd, pid
        try:
            return step()
        finally:
            self._local.round = None
            rnd.leave(pid)


class _Arrival:
    """One request waiting at one MoE layer (guarded by the round's lock)."""

    __slots__ = ("error", "hint", "item", "layer", "ready", "tokens", "want")

    def __init__(self, lock: threading.Lock, layer: int, want: set[int], hint: tuple[int, list[int]] | None,
                 tokens: dict[int, int] | None):
        self.layer, self.want, self.hint = layer, want, hint  # want: experts not yet handed over
        self.tokens = tokens  # expert -> tokens of this request routed to it (None: not told)
        self.ready = threading.Condition(lock)  # the driver handed over an item or an error
        self.item: Item | None = None  # handed over by the driver, not yet taken
        self.error: BaseException | None = None  # set by the driver: nothing more will come


class _Round:
    """The rendezvous of one round's participants (request threads) and its driver (engine thread).

    One lock guards everything; the driver waits on its own Condition and each arrival has one, so a
    handed-over expert wakes only the requests that need it (not every thread of the round).
    """

    def __init__(self, n: int):
        self._lock = threading.Lock()
        self._driver = threading.Condition(self._lock)  # participants arrived, left or took their expert
        self._active = set(range(n))  # participants still stepping
        self._arrived: dict[int, _Arrival] = {}  # participants waiting at a layer
        self._hints: dict[int, tuple[int, list[int]]] = {}  # next-layer predictions not yet attached
        self._owed: set[int] = set()  # hold the current expert and have not asked for the next
        self._aborted: BaseException | None = None

    # ---- request threads ----

    def hint(self, pid: int, layer: int, experts: list[int]) -> None:
        with self._lock:
            self._hints[pid] = (layer, list(experts))

    def experts(self, pid: int, layer: int, needed: Sequence[int],
                tokens: Sequence[int] | None = None) -> Iterator[Item]:
        counts: dict[int, int] | None = None
        if tokens is not None:
            counts = dict.fromkeys(needed, 0)
            for e, n in zip(needed, tokens, strict=True):
                counts[e] += n
        with self._lock:
            a = _Arrival(self._lock, layer, set(needed), self._hints.pop(pid, None), counts)
            if not a.want:
                return
            if self._aborted is not None:
                raise SharedLoadError(f"the round was aborted: {self._aborted}") from self._aborted
            self._arrived[pid] = a
            self._driver.notify()
        try:
            while True:
                with self._lock:
                    while a.item is None and a.error is None:
                        a.ready.wait()
                    if a.item is None:
                        raise a.error
                    item, a.item, last = a.item, None, not a.want
                yield item
                if last:
                    return
                with self._lock:
                    self._took(pid)
        finally:  # done, failed or closed early: nobody waits for this participant at this layer
            with self._lock:
                self._took(pid)
                if self._arrived.get(pid) is a:
                    del self._arrived[pid]
                    self._driver.notify()

    def leave(self, pid: int) -> None:
        """The participant's step returned or raised: never wait for it again."""
        with self._lock:
            self._active.discard(pid)
            self._took(pid)
            self._arrived.pop(pid, None)
            self._hints.pop(pid, None)
            self._driver.notify()

    def _took(self, pid: int) -> None:
        """pid is done with the current expert (holds the lock); the last one lets the driver resume."""
        if pid in self._owed:
            self._owed.discard(pid)
            if not self._owed:
                self._driver.notify()

    # ---- engine thread ----

    def drive(self, source: ExpertSource, stats: ShareStats) -> None:
        """Serve layer after layer until every participant has left; never raises for a load failure."""
        try:
            while (group := self._next_group()) is not None:
                layer, members = group
                union = sorted(set().union(*(a.want for a in members.values())))
                stats.layers += 1
                stats.requested += sum(len(a.want) for a in members.values())
                stats.loaded += len(union)
                self._serve(source, layer, union, _summed_tokens(union, members.values()), members)
        except BaseException as exc:  # a bug here must not leave request threads waiting forever
            self._abort(exc)
            raise

    def _next_group(self) -> tuple[int, dict[int, _Arrival]] | None:
        """Wait until everyone still stepping waits at a layer; the ones at the lowest layer go first."""
        with self._lock:
            while self._active and not self._active <= self._arrived.keys():
                self._driver.wait()
            if not self._active:
                return None
            layer = min(a.layer for a in self._arrived.values())
            return layer, {pid: a for pid, a in self._arrived.items() if a.layer == layer}

    def _serve(self, source: ExpertSource, layer: int, union: list[int], tokens: list[int] | None,
               members: dict[int, _Arrival]) -> None:
        hint = _merge_hints([a.hint for a in members.values() if a.hint is not None])
        if hint is not None and getattr(source, "hint", None) is not None:
            source.hint(*hint)
        error: Exception | None = None
        gen = source.experts(layer, union, tokens)
        try:
            for item in gen:
                with self._lock:
                    takers = {pid: a for pid, a in members.items() if self._arrived.get(pid) is a and item[0] in a.want}
                    self._owed = set(takers)
                    for a in takers.values():
                        a.want.discard(item[0])
                        a.item = item
                        a.ready.notify()
                    while self._owed:  # the source may reuse this expert's buffers once resumed
                        self._driver.wait()
        except Exception as exc:  # reaches the requests that still wait; the engine thread lives on
            log.exception("loading the experts of layer %d for a round failed", layer)
            error = exc
        finally:
            gen.close()
        with self._lock:
            for pid, a in members.items():
                if self._arrived.get(pid) is a:  # still waiting: the source failed or skipped an expert
                    del self._arrived[pid]
                    why = f"{type(error).__name__}: {error}" if error else f"experts {sorted(a.want)} never came"
                    a.error = SharedLoadError(f"loading the experts of layer {layer} failed ({why})")
                    a.error.__cause__ = error
                    a.ready.notify()

    def _abort(self, exc: BaseException) -> None:
        with self._lock:
            self._aborted = exc
            for a in self._arrived.values():
                a.error = SharedLoadError(f"the round was aborted: {exc}")
                a.ready.notify()
            self._arrived.clear()
            self._owed.clear()


def _summed_tokens(union: list[int], members: Iterable[_Arrival]) -> list[int] | None:
    """Each expert's tokens over the round's requests (what the eviction policy weighs); None if any
    request did not say (its source was called without counts)."""
    total = dict.fromkeys(union, 0)
    for a in members:
        if a.tokens is None:
            return None
        for e, n in a.tokens.items():
            total[e] += n
    return [total[e] for e in union]


def _merge_hints(hints: list[tuple[int, list[int]]]) -> tuple[int, list[int]] | None:
    """One hint for the next layer: the participants' predictions interleaved by rank, without repeats."""
    if not hints:
        return None
    layer = hints[0][0]
    ranked = itertools.zip_longest(*(ids for lay, ids in hints if lay == layer))
    return layer, list(dict.fromkeys(e for rank in ranked for e in rank if e is not None))


class Batcher:
    """Steps a round's requests together over one SharedExperts; owned by one service.

    `run(steps)` returns, in order, each step's value or the exception it raised. One step, or any
    number without a SharedExperts (a model zipmoe does not serve), run one by one on the calling
    thread; more run on a pool of request threads (grown on demand: every participant needs its own
    thread, or the rendezvous would wait for one never started).
    """

    def __init__(self, shared: SharedExperts | None):
        self.shared = shared
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    def run(self, steps: Sequence[Callable[[], T]]) -> list[T | Exception]:
        if self.shared is None or len(steps) <= 1:
            return [_call(step) for step in steps]
        pool = self._pool_for(len(steps))
        rnd = _Round(len(steps))
        self.shared.stats.rounds += 1
        self.shared.stats.steps += len(steps)
        futures = [pool.submit(self.shared.participate, rnd, pid, step) for pid, step in enumerate(steps)]
        try:
            rnd.drive(self.shared.source, self.shared.stats)
        except Exception:  # a driver bug: the round was aborted, so each step ends with SharedLoadError
            log.exception("the shared round failed")
        return [_result(f) for f in futures]

    def _pool_for(self, n: int) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_size < n:
            if self._pool is not None:
                self._pool.shutdown(wait=True)  # idle between rounds: returns at once
            self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="zipmoe-request")
            self._pool_size = n
        return self._pool

    def close(self) -> None:
        """Join the request threads (call between rounds)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool, self._pool_size = None, 0


def _call(step: Callable[[], T]) -> T | Exception:
    try:
        return step()
    except Exception as exc:
        return exc


def _result(future: Future) -> Any:
    exc = future.exception()
    return exc if exc is not None else future.result()
