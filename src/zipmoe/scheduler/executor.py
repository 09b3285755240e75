"""The executor: runs one layer's Plan on one I/O thread and W decode workers (queue semantics).

Arrow: Plan + ops (engine-supplied callables that fill buffers) ──▶ experts handed to the caller
as their weights become ready. Threads are created once per Executor and reused for every layer:
  * I/O thread: runs the plan's reads back to back in `io_queue` order (one channel, no overlap);
  * W decode workers: take `decode_queue` steps FIFO; a worker holds its step until the step's
    inputs are ready (the E read for a shard; every shard and the SM read for a merge), as in
    scheduler/sim.py's queue semantics, which the plan's predicted times assume;
  * the caller's thread (the compute stream) iterates the RunHandle and computes each expert.
Errors in any op cancel the run; the handle drains in-flight work (so no buffer is written after
the layer ends) and re-raises the first error. Times in s.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Protocol

from zipmoe.errors import ZipMoEError
from zipmoe.scheduler.tasks import MERGE, Plan, Plane
from zipmoe.types import ExpertKey, State

_STOP = object()


class LayerOps(Protocol):
    """What the engine implements; each call fills one buffer and may run on any executor thread."""

    def read_sm(self, key: ExpertKey) -> None: ...
    def read_e(self, key: ExpertKey) -> None: ...
    def decode_shard(self, key: ExpertKey, shard: int) -> None: ...
    def merge(self, key: ExpertKey) -> None: ...


class RunHandle:
    """One running plan: iterate it on the compute thread to get experts in ready order."""

    def __init__(self, plan: Plan, ops: LayerOps):
        self.plan, self.ops = plan, ops
        self.ready: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.cancelled = False
        self.io_busy_s = 0.0  # s the I/O thread spent in reads
        self.decode_busy_s = 0.0  # summed s workers spent in decode/merge ops
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0  # jobs handed to threads and not finished
        self._left = len(plan.tasks)  # experts not yet handed to the caller
        tasks = {t.key: t for t in plan.tasks}
        self.e_read = {k: threading.Event() for k in tasks}
        self.sm_read = {k: threading.Event() for k in tasks}
        self.decoded = {k: threading.Event() for k in tasks}
        self.shards_left = {k: t.k for k, t in tasks.items()}
        for key, task in tasks.items():
            if not task.reads_e:
                self.e_read[key].set()
            if not task.reads_sm:
                self.sm_read[key].set()
            if task.state is State.F:
                self.ready.put(key)

    # ---- bookkeeping shared by the threads ----

    def begin(self, n: int = 1) -> None:
        with self._lock:
            self._pending += n

    def end(self) -> None:
        with self._lock:
            self._pending -= 1
            if not self._pending:
                self._idle.notify_all()

    def fail(self, exc: BaseException) -> None:
        """First error wins; wake everyone waiting so the run drains."""
        with self._lock:
            if self.error is None:
                self.error = exc
            self.cancelled = True
        for events in (self.e_read, self.sm_read, self.decoded):
            for ev in events.values():
                ev.set()
        self.ready.put(_STOP)

    def add_busy(self, seconds: float) -> None:
        with self._lock:
            self.decode_busy_s += seconds

    def shard_done(self, key: ExpertKey) -> None:
        with self._lock:
            self.shards_left[key] -= 1
            done = self.shards_left[key] == 0
        if done:
            self.decoded[key].set()

    # ---- the caller's side ----

    def __iter__(self) -> Iterator[ExpertKey]:
        return self

    def __next__(self) -> ExpertKey:
        if self._left == 0:
            self.close()
            raise StopIteration
        item = self.ready.get()
        if item is _STOP:
            self.close()
            raise self.error  # type: ignore[misc]
        self._left -= 1
        return item

    def close(self) -> None:
        """Cancel what has not started and wait for in-flight ops (buffers stay untouched after)."""
        with self._lock:
            if self._left:
                self.cancelled = True
        if self.cancelled:
            for events in (self.e_read, self.sm_read, self.decoded):
                for ev in events.values():
                    ev.set()
        with self._idle:
            while self._pending:
                self._idle.wait()


class Executor:
    """One I/O thread + W decode workers, shared by every layer of one engine (see module docstring)."""

    def __init__(self, workers: int):
        if workers < 1:
            raise ZipMoEError(f"the executor needs at least one decode worker, got {workers}")
        self.workers = workers
        self._io_q: queue.SimpleQueue = queue.SimpleQueue()
        self._dec_q: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._io_loop, name="zipmoe-io", daemon=True)]
        self._threads += [
            threading.Thread(target=self._decode_loop, name=f"zipmoe-decode-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()
        self._closed = False

    def run(self, plan: Plan, ops: LayerOps) -> RunHandle:
        """Start the plan now; iterate the handle to receive experts as they become ready."""
        if self._closed:
            raise ZipMoEError("the executor is closed (the model was unloaded)")
        handle = RunHandle(plan, ops)
        seen: set[ExpertKey] = set()
        for step in plan.decode_queue:  # queue semantics need every shard queued before its merge
            if step.shard == MERGE:
                seen.add(step.key)
            elif step.key in seen:
                raise ZipMoEError(f"plan queues a shard of {step.key} after its merge")
        handle.begin(1 + len(plan.decode_queue))
        self._io_q.put(handle)
        for step in plan.decode_queue:
            self._dec_q.put((handle, step))
        return handle

    def _io_loop(self) -> None:
        while (handle := self._io_q.get()) is not _STOP:
            t0 = time.perf_counter()
            try:
                for step in handle.plan.io_queue:
                    if handle.cancelled:
                        break
                    if step.plane is Plane.E:
                        handle.ops.read_e(step.key)
                        handle.e_read[step.key].set()
                    else:
                        handle.ops.read_sm(step.key)
                        handle.sm_read[step.key].set()
            except BaseException as exc:  # handed to the caller's thread
                handle.fail(exc)
            finally:
                handle.io_busy_s += time.perf_counter() - t0
                handle.end()

    def _decode_loop(self) -> None:
        while (item := self._dec_q.get()) is not _STOP:
            handle, step = item
            try:
                if step.shard == MERGE:
                    handle.decoded[step.key].wait()
                    handle.sm_read[step.key].wait()
                    if not handle.cancelled:
                        t0 = time.perf_counter()
                        handle.ops.merge(step.key)
                        handle.add_busy(time.perf_counter() - t0)
                        handle.ready.put(step.key)
                else:
                    handle.e_read[step.key].wait()
                    if not handle.cancelled:
                        t0 = time.perf_counter()
                        handle.ops.decode_shard(step.key, step.shard)
                        handle.add_busy(time.perf_counter() - t0)
                        handle.shard_done(step.key)
            except BaseException as exc:  # handed to the caller's thread
                handle.fail(exc)
            finally:
                handle.end()

    def close(self) -> None:
        """Stop and join every thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._io_q.put(_STOP)
        for _ in range(self.workers):
            self._dec_q.put(_STOP)
        for t in self._threads:
            t.join()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
