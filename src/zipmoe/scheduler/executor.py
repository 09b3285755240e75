"""Runs a Plan: one I/O thread reads planes, W decode workers decode shards and merge, and the
caller's thread (the compute stream) receives each expert as soon as its weights are ready.

Arrow: Plan + ExpertOps (engine) ──Executor.run──▶ ready ExpertKeys (to compute) + PlanTimings.
Semantics are the queue semantics of scheduler/sim.py, so `Plan.makespan_s` predicts this run:
reads back to back in io_queue order; each free worker takes the next decode_queue step and waits
(on a condition, no polling) until its inputs are in; experts are handed over in ready order.

# E=experts K=shards W=workers; times in s (time.perf_counter)
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from zipmoe.errors import ZipMoEError
from zipmoe.scheduler.tasks import MERGE, DecodeStep, ExpertTimes, IoStep, Plan, PlanTimings, Plane
from zipmoe.types import ExpertKey

_FAILED = -1  # ready-queue marker: look at _Run.error


class ExpertTaskError(ZipMoEError):
    """An engine op failed for one expert (the original exception is the __cause__)."""

    def __init__(self, message: str, key: ExpertKey, stage: str):
        super().__init__(message)
        self.key, self.stage = key, stage


class ExpertOps(Protocol):
    """What the engine implements; each call fills caller-owned buffers for one expert."""

    def read_sm(self, key: ExpertKey) -> None: ...  # I/O thread: read the SM plane from disk
    def read_e(self, key: ExpertKey) -> None: ...  # I/O thread: read the compressed E shards
    def decode_shard(self, key: ExpertKey, shard: int) -> None: ...  # a worker: decode (+merge) one shard
    def merge(self, key: ExpertKey) -> None: ...  # a worker: SM + E -> BF16 (only if merge_s > 0)


class _Run:
    """Shared state of one plan execution; every field below the lock is guarded by it."""

    def __init__(self, plan: Plan, ops: ExpertOps):
        self.plan, self.ops = plan, ops
        self.index = {t.key: e for e, t in enumerate(plan.tasks)}
        self.cond = threading.Condition(threading.Lock())
        self.ready_q: queue.SimpleQueue[int] = queue.SimpleQueue()
        n = len(plan.tasks)
        self.e_in = [not t.reads_e for t in plan.tasks]  # E shards are in memory
        self.shards_left = [t.k if t.decodes else 0 for t in plan.tasks]
        self.sm_left = [int(t.reads_sm) for t in plan.tasks]
        self.has_merge = [False] * n
        for s in plan.decode_queue:
            if s.shard == MERGE:
                self.has_merge[self.index[s.key]] = True
        self.error: tuple[BaseException, ExpertKey, str] | None = None
        self.stopped = False  # no op may start (failure or cancellation)
        self.in_flight = 0  # ops running now
        self.t0 = time.perf_counter()
        self.io_busy = self.decode_busy = 0.0
        nan = math.nan
        self.io_start, self.io_end, self.dec_start = [nan] * n, [nan] * n, [nan] * n
        self.dec_end, self.ready = [nan] * n, [nan] * n

    def begin(self, e: int, need_e: bool) -> bool:
        """Wait until the step's inputs are in (a shard: E; a merge: all shards + SM); False if stopped."""
        with self.cond:
            while not self.stopped and not (self.e_in[e] if need_e else self.inputs_in(e)):
                self.cond.wait()
            if self.stopped:
                return False
            self.in_flight += 1
            return True

    def inputs_in(self, e: int) -> bool:
        return self.shards_left[e] == 0 and self.sm_left[e] == 0

    def mark_ready(self, e: int, now: float) -> None:
        """Caller holds the lock."""
        self.ready[e] = now - self.t0
        self.ready_q.put(e)

    def fail(self, exc: BaseException | None, key: ExpertKey, stage: str) -> None:
        with self.cond:
            if not self.stopped:
                self.stopped = True
                if exc is not None:
                    self.error = (exc, key, stage)
            self.cond.notify_all()
        self.ready_q.put(_FAILED)

    def drain(self) -> None:
        """Stop and wait until no op of this run is running (then its buffers are free)."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
            while self.in_flight:
                self.cond.wait()

    def read(self, step: IoStep) -> bool:
        """One read on the I/O thread; False once the run is stopped."""
        e = self.index[step.key]
        with self.cond:
            if self.stopped:
                return False
            self.in_flight += 1
        t0 = time.perf_counter()
        try:
            (self.ops.read_e if step.plane == Plane.E else self.ops.read_sm)(step.key)
        except BaseException as exc:
            self.fail(exc, step.key, f"reading the {step.plane.name} plane of")
            return self.finish_op()
        t1 = time.perf_counter()
        with self.cond:
            self.in_flight -= 1
            self.io_busy += t1 - t0
            self.io_start[e] = min(self.io_start[e], t0 - self.t0) if self.io_end[e] == self.io_end[e] else t0 - self.t0
            self.io_end[e] = t1 - self.t0
            if step.plane == Plane.E:
                self.e_in[e] = True
            else:
                self.sm_left[e] = 0
                if self.inputs_in(e) and not self.has_merge[e]:
                    self.mark_ready(e, t1)
            self.cond.notify_all()
            return not self.stopped

    def step(self, step: DecodeStep) -> None:
        """One decode or merge on a worker thread."""
        e = self.index[step.key]
        if not self.begin(e, need_e=step.shard != MERGE):
            return
        t0 = time.perf_counter()
        try:
            if step.shard == MERGE:
                self.ops.merge(step.key)
            else:
                self.ops.decode_shard(step.key, step.shard)
        except BaseException as exc:
            what = "merging" if step.shard == MERGE else f"decoding exponent shard {step.shard} of"
            self.fail(exc, step.key, what)
            self.finish_op()
            return
        t1 = time.perf_counter()
        with self.cond:
            self.in_flight -= 1
            self.decode_busy += t1 - t0
            if not self.dec_start[e] <= t0 - self.t0:
                self.dec_start[e] = t0 - self.t0
            self.dec_end[e] = max(t1 - self.t0, 0.0 if math.isnan(self.dec_end[e]) else self.dec_end[e])
            if step.shard == MERGE:
                self.mark_ready(e, t1)
            else:
                self.shards_left[e] -= 1
                if self.inputs_in(e) and not self.has_merge[e]:
                    self.mark_ready(e, t1)
            self.cond.notify_all()

    def finish_op(self) -> bool:
        with self.cond:
            self.in_flight -= 1
            self.cond.notify_all()
        return False

    def raise_error(self) -> None:
        assert self.error is not None
        exc, key, stage = self.error
        if isinstance(exc, ZipMoEError):
            exc.add_note(f"zipmoe executor: while {stage} {key}")
            raise exc
        raise ExpertTaskError(f"{stage} {key} failed: {type(exc).__name__}: {exc}", key, stage) from exc


class LayerRun:
    """One execution of a plan: iterate it to receive each expert as its weights become ready.

    Iterate to the end (or break / close(); the run is then cancelled and drained). `timings` is
    set once the iteration is over, also after a failure.
    """

    def __init__(self, executor: Executor, plan: Plan, ops: ExpertOps):
        self._executor, self._plan, self._ops = executor, plan, ops
        self.timings: PlanTimings | None = None

    def __iter__(self) -> Iterator[ExpertKey]:
        return self._executor._execute(self, self._plan, self._ops)


class Executor:
    """Owns the threads that load experts: one I/O thread ("zipmoe-io") that performs every read of a
    plan, and `workers` decode threads ("zipmoe-decode-i") that take decode/merge steps from one FIFO.
    The compute stream is the caller's thread. Threads are created once and reused for every layer;
    close() (or leaving the `with` block) stops and joins them all. One run at a time."""

    def __init__(self, workers: int):
        if workers < 1:
            raise ZipMoEError(f"an executor needs at least one decode worker, got workers={workers}")
        self.workers = workers
        self._io_q: queue.SimpleQueue[_Run | None] = queue.SimpleQueue()
        self._step_q: queue.SimpleQueue[tuple[_Run, DecodeStep] | None] = queue.SimpleQueue()
        self._busy = threading.Lock()  # held while a run is in progress
        self._closed = False
        self._threads = [threading.Thread(target=self._io_loop, name="zipmoe-io", daemon=True)]
        self._threads += [threading.Thread(target=self._worker_loop, name=f"zipmoe-decode-{i}", daemon=True)
                          for i in range(workers)]
        for t in self._threads:
            t.start()

    def _io_loop(self) -> None:
        while (run := self._io_q.get()) is not None:
            for step in run.plan.io_queue:
                if not run.read(step):
                    break

    def _worker_loop(self) -> None:
        while (item := self._step_q.get()) is not None:
            item[0].step(item[1])

    def run(self, plan: Plan, ops: ExpertOps) -> LayerRun:
        """Execute `plan` when iterated: `for key in (r := ex.run(plan, ops)): compute(key)`; r.timings."""
        if self._closed:
            raise ZipMoEError("executor is closed; create a new Executor")
        return LayerRun(self, plan, ops)

    def run_all(self, plan: Plan, ops: ExpertOps, on_ready: Callable[[ExpertKey], None]) -> PlanTimings:
        """Callback form of run(): calls on_ready(key) on this thread as each expert becomes ready."""
        layer = self.run(plan, ops)
        for key in layer:
            on_ready(key)
        assert layer.timings is not None
        return layer.timings

    def _execute(self, layer: LayerRun, plan: Plan, ops: ExpertOps) -> Iterator[ExpertKey]:
        if self._closed:
            raise ZipMoEError("executor is closed; create a new Executor")
        if not self._busy.acquire(blocking=False):
            raise ZipMoEError("executor is already running a plan; finish that iteration first")
        try:
            run = _Run(plan, ops)
            yield from self._drive(layer, run)
        finally:
            self._busy.release()

    def _drive(self, layer: LayerRun, run: _Run) -> Iterator[ExpertKey]:
        delivered: list[int] = []
        stall = 0.0
        try:
            for e, t in enumerate(run.plan.tasks):
                if not t.decodes and not t.reads_sm and not t.reads_e:
                    run.mark_ready(e, run.t0)  # F: ready at once
            if run.plan.io_queue:
                self._io_q.put(run)
            for step in run.plan.decode_queue:
                self._step_q.put((run, step))
            while len(delivered) < len(run.plan.tasks):
                t0 = time.perf_counter()
                e = run.ready_q.get()
                stall += time.perf_counter() - t0
                if e == _FAILED:
                    run.drain()
                    run.raise_error()
                delivered.append(e)
                yield run.plan.tasks[e].key
        finally:
            run.drain()  # cancelled by the caller (break, exception) or done: no op may still run
            layer.timings = _timings(run, delivered, stall)

    def close(self) -> None:
        """Stop and join every thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._io_q.put(None)
        for _ in range(self.workers):
            self._step_q.put(None)
        for t in self._threads:
            t.join()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _timings(run: _Run, delivered: list[int], stall: float) -> PlanTimings:
    wall = time.perf_counter() - run.t0
    got = {e: n for n, e in enumerate(delivered)}
    experts = tuple(
        ExpertTimes(run.plan.tasks[e].key, run.io_start[e], run.io_end[e], run.dec_start[e], run.dec_end[e],
                    run.ready[e], math.nan, math.nan) for e in delivered)
    del got
    return PlanTimings(wall, run.io_busy, run.decode_busy, stall, experts)
