"""Runs a Plan: the I/O channel reads planes, W decode workers decode shards and merge, and the
caller's thread (the compute stream) receives each expert as soon as its weights are ready.

Arrow: Plan + LayerOps (engine) ──Executor.run──▶ ready ExpertKeys (to compute) + PlanTimings.
Semantics are the queue semantics of scheduler/sim.py, so `Plan.makespan_s` predicts this run:
reads back to back in io_queue order; each free worker takes the next decode_queue step and waits
(on a condition, no polling) until its inputs are in; experts are handed over in ready order.
The I/O channel is `io_threads` threads taking reads from the io_queue in order: with two, the next
read is already in the kernel while the previous one's thread waits for the GIL after its syscall
(measured: a blocking read returns ~5 ms late when another thread runs Python, sys.getswitchinterval).
Decode workers may run at a lower CPU priority (`decode_nice`): on a CPU device the compute thread's
torch ops fan out to a thread pool as wide as the machine, and each op waits for its slowest pool
thread; a worker that keeps a core busy makes that thread wait for its time slice (see
lower_thread_priority). Off by default: end to end it has not paid (BENCHMARKS.md, seventeenth session).

# E=experts K=shards W=workers; times in s (time.perf_counter)
"""

from __future__ import annotations

import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from zipmoe.errors import ExpertTaskError, ZipMoEError
from zipmoe.scheduler.tasks import MERGE, DecodeStep, ExpertTimes, IoStep, Plan, Plane, PlanTimings
from zipmoe.types import ExpertKey

if TYPE_CHECKING:  # imported where used: the scheduler itself stays free of numpy (test_scheduler_is_pure)
    from zipmoe.store.native_reads import NativeReadChannel

_FAILED = -1  # ready-queue marker: look at _Run.error


class LayerOps(Protocol):
    """What the engine implements; each call fills caller-owned buffers for one expert."""

    def read_sm(self, key: ExpertKey) -> None: ...  # I/O thread: read the SM plane from disk
    def read_e(self, key: ExpertKey) -> None: ...  # I/O thread: read the compressed E shards
    # native reads only (Executor(native_reads=True)): where read_sm (sm) / read_e reads, and finishing it
    def read_target(self, key: ExpertKey, sm: bool) -> tuple[int, int, int, int]: ...  # fd, start, bytes, address
    def read_landed(self, key: ExpertKey, sm: bool, seconds: float) -> None: ...
    def decode_shard(self, key: ExpertKey, shard: int) -> None: ...  # a worker: decode (+merge) one shard
    def merge(self, key: ExpertKey) -> None: ...  # a worker: SM + E -> BF16 (only if merge_s > 0)


class _Run:
    """Shared state of one plan execution. The counters, flags and timing lists are written under
    `cond` by the I/O thread and the workers; `delivered` only by the caller's thread."""

    def __init__(self, plan: Plan, ops: LayerOps):
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
        # a shard waits for the SM plane only when it merges in place (no merge step, no late merge)
        self.shard_needs_sm = [not m and not t.late_merge for m, t in zip(self.has_merge, plan.tasks, strict=True)]
        self.error: tuple[BaseException, ExpertKey, str] | None = None
        self.stopped = False  # no op may start (failure or cancellation)
        self.io_next = 0  # next io_queue step to claim (the I/O threads take steps in order)
        self.in_flight = 0  # ops running now
        self.t0 = time.perf_counter()
        self.io_busy = self.decode_busy = 0.0
        nan = math.nan
        self.io_start, self.io_end, self.dec_start = [nan] * n, [nan] * n, [nan] * n
        self.dec_end, self.ready, self.delivered = [nan] * n, [nan] * n, [nan] * n

    def begin(self, e: int, need_e: bool) -> bool:
        """Wait until the step's inputs are in (a shard: E, and SM when its expert has no merge step and no
        late merge, i.e. the shard merges in place; a merge: all shards + SM); False if stopped."""
        with self.cond:
            while not self.stopped and not (self.shard_inputs_in(e) if need_e else self.inputs_in(e)):
                self.cond.wait()
            if self.stopped:
                return False
            self.in_flight += 1
            return True

    def inputs_in(self, e: int) -> bool:
        return self.shards_left[e] == 0 and self.sm_left[e] == 0

    def shard_inputs_in(self, e: int) -> bool:
        return self.e_in[e] and (not self.shard_needs_sm[e] or self.sm_left[e] == 0)

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

    def widen(self, starts: list[float], ends: list[float], e: int, t0: float, t1: float) -> None:
        """Stretch expert e's recorded stage span to cover an op from t0 to t1 (caller holds the lock)."""
        if math.isnan(starts[e]) or t0 - self.t0 < starts[e]:
            starts[e] = t0 - self.t0
        if math.isnan(ends[e]) or t1 - self.t0 > ends[e]:
            ends[e] = t1 - self.t0

    def claim_read(self) -> IoStep | None:
        """The next read of the io_queue for this I/O thread; None when all are claimed or the run stopped."""
        with self.cond:
            if self.stopped or self.io_next == len(self.plan.io_queue):
                return None
            step = self.plan.io_queue[self.io_next]
            self.io_next += 1
            self.in_flight += 1
            return step

    def read(self, step: IoStep) -> bool:
        """One read (claimed with claim_read) on an I/O thread; False once the run is stopped."""
        t0 = time.perf_counter()
        try:
            (self.ops.read_e if step.plane == Plane.E else self.ops.read_sm)(step.key)
        except BaseException as exc:
            self.fail(exc, step.key, f"reading the {step.plane.name} plane of")
            return self.finish_op()
        return self.read_done(step, t0, time.perf_counter())

    def submit_native(self, channel: NativeReadChannel) -> None:
        """Hand the whole io_queue to the native channel at once (its reads then never wait for the GIL);
        each completion comes back through native_done. Every read counts as in flight until then, so
        drain() waits for the reads a cancelled run had started."""
        from zipmoe.store.native_reads import ReadBatch

        targets = []
        for s in self.plan.io_queue:
            try:
                targets.append(self.ops.read_target(s.key, s.plane == Plane.SM))
            except BaseException as exc:
                self.fail(exc, s.key, f"preparing the read of the {s.plane.name} plane of")
                return
        self.native_batch = ReadBatch.of(targets, self.native_done)
        with self.cond:
            self.io_next = len(targets)
            self.in_flight += len(targets)
        channel.submit(self.native_batch)

    def native_done(self, i: int, got: int, t0: float, t1: float) -> None:
        """The native channel's completion of io_queue[i] (on its completion thread): finish the read, or redo
        it in Python when it failed or came up short, so that the error raised is the one read_sm / read_e
        give (EOF, EIO, a closed store)."""
        step = self.plan.io_queue[i]
        with self.cond:
            stopped = self.stopped
        sm = step.plane == Plane.SM
        try:
            if not stopped and got == self.native_batch.spans[i]:
                self.ops.read_landed(step.key, sm, t1 - t0)
            elif not stopped:
                (self.ops.read_sm if sm else self.ops.read_e)(step.key)
                t1 = time.perf_counter()
        except BaseException as exc:
            self.fail(exc, step.key, f"reading the {step.plane.name} plane of")
            stopped = True
        if stopped:
            self.finish_op()  # the read is over either way: drain() may return once every one is
        else:
            self.read_done(step, t0, t1)

    def read_done(self, step: IoStep, t0: float, t1: float) -> bool:
        """Book a finished read (from t0 to t1) and wake who waits for it; False once the run is stopped."""
        e = self.index[step.key]
        with self.cond:
            self.in_flight -= 1
            self.io_busy += t1 - t0
            self.widen(self.io_start, self.io_end, e, t0, t1)
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
            self.widen(self.dec_start, self.dec_end, e, t0, t1)
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


class RunHandle:
    """One running plan (started by Executor.run): iterate it on the compute thread to receive each
    expert as its weights become ready. After the last expert, a failure, or close() (which cancels
    what has not started and waits for in-flight ops, so no buffer is written afterwards),
    `timings` holds what the run measured."""

    def __init__(self, run: _Run):
        self._run = run
        self._delivered: list[int] = []
        self._stall = 0.0
        self.timings: PlanTimings | None = None

    @property
    def io_busy_s(self) -> float:
        """s the I/O threads have spent in reads so far (summed over threads)."""
        return self._run.io_busy

    @property
    def decode_busy_s(self) -> float:
        """Summed s the workers have spent in decode_shard / merge so far."""
        return self._run.decode_busy

    def __iter__(self) -> RunHandle:
        return self

    def __next__(self) -> ExpertKey:
        run = self._run
        if len(self._delivered) == len(run.plan.tasks) or self.timings is not None:
            self.close()
            raise StopIteration
        t0 = time.perf_counter()
        e = run.ready_q.get()
        self._stall += time.perf_counter() - t0
        if e == _FAILED:
            self.close()
            run.raise_error()
        self._delivered.append(e)
        run.delivered[e] = time.perf_counter() - run.t0
        return run.plan.tasks[e].key

    def close(self) -> None:
        """Cancel and drain (a no-op once finished); idempotent."""
        if self.timings is None:
            self._run.drain()
            self.timings = _timings(self._run, self._delivered, self._stall)

    def __enter__(self) -> RunHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Executor:
    """Owns the threads that load experts: the I/O channel ("zipmoe-io-i": `io_threads` threads taking
    a plan's reads in order, see the module docstring) and `workers` decode threads ("zipmoe-decode-i")
    that take decode/merge steps from one FIFO. The compute stream is the caller's thread, which
    iterates the RunHandle. Threads are created once and reused for every layer; close() (or leaving
    the `with` block) stops and joins them all. Runs are served in the order they were started."""

    def __init__(self, workers: int, io_threads: int = 2, native_reads: bool = False, decode_nice: int = 0):
        if workers < 1:
            raise ZipMoEError(f"an executor needs at least one decode worker, got workers={workers}")
        if io_threads < 1:
            raise ZipMoEError(f"an executor needs at least one I/O thread, got io_threads={io_threads}")
        self.workers, self.io_threads, self.decode_nice = workers, io_threads, decode_nice
        self._io_q: queue.SimpleQueue[_Run | None] = queue.SimpleQueue()
        self._step_q: queue.SimpleQueue[tuple[_Run, DecodeStep] | None] = queue.SimpleQueue()
        self._closed = False
        # native_reads: the io_threads streams are native (store/native_reads), fed a layer's reads at once
        self._native: NativeReadChannel | None = None
        if native_reads:  # after the checks: only the thread starts below follow it
            from zipmoe.store.native_reads import NativeReadChannel

            self._native = NativeReadChannel(io_threads)
        self._threads = [] if native_reads else [
            threading.Thread(target=self._io_loop, name=f"zipmoe-io-{i}", daemon=True) for i in range(io_threads)]
        self._threads += [threading.Thread(target=self._worker_loop, name=f"zipmoe-decode-{i}", daemon=True)
                          for i in range(workers)]
        for t in self._threads:
            t.start()

    def _io_loop(self) -> None:
        # Each run is queued once per I/O thread, so every thread joins it; runs stay in start order.
        while (run := self._io_q.get()) is not None:
            while (step := run.claim_read()) is not None:
                if not run.read(step):
                    break

    def _worker_loop(self) -> None:
        if self.decode_nice:
            lower_thread_priority(self.decode_nice)
        while (item := self._step_q.get()) is not None:
            item[0].step(item[1])

    def run(self, plan: Plan, ops: LayerOps) -> RunHandle:
        """Start `plan` now (reads and decodes begin at once); iterate the handle for ready experts."""
        if self._closed:
            raise ZipMoEError("executor is closed (the model was unloaded); create a new Executor")
        _check(plan)
        run = _Run(plan, ops)
        with run.cond:
            for e, t in enumerate(plan.tasks):
                if not (t.decodes or t.reads_sm or t.reads_e):
                    run.mark_ready(e, run.t0)  # F: ready at once
        if plan.io_queue and self._native is not None:
            run.submit_native(self._native)
        elif plan.io_queue:
            for _ in range(self.io_threads):
                self._io_q.put(run)
        for step in plan.decode_queue:
            self._step_q.put((run, step))
        return RunHandle(run)

    def run_all(self, plan: Plan, ops: LayerOps, on_ready: Callable[[ExpertKey], None]) -> PlanTimings:
        """Callback form of run(): calls on_ready(key) on this thread as each expert becomes ready."""
        with self.run(plan, ops) as handle:
            for key in handle:
                on_ready(key)
        assert handle.timings is not None
        return handle.timings

    def close(self) -> None:
        """Stop and join every thread (idempotent). Runs still queued are not executed."""
        if self._closed:
            return
        self._closed = True
        if self._native is not None:
            self._native.close()
        for _ in range(self.io_threads):
            self._io_q.put(None)
        for _ in range(self.workers):
            self._step_q.put(None)
        for t in self._threads:
            t.join()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lower_thread_priority(by: int) -> bool:
    """Raise the calling thread's nice value by `by` (Linux: each thread has its own); False where that
    is not possible (another OS, a sandbox), which only costs speed.

    Why: measured on the 2-core dev machine, a 2816×2048 BF16 linear on torch's 2 threads took 0.77 ms
    alone, 2.6 ms (mean; p90 8 ms) beside one busy numba thread, and 0.67 ms when that thread ran at nice
    10 (scripts/cpu_contention.py). The workers still get every core the compute thread leaves idle, which
    at batch 1 is most of the time. Raising a nice value needs no privilege; it cannot be undone, so only
    threads that live for the engine's lifetime call this."""
    if not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except OSError:
        return False
    return True


def _check(plan: Plan) -> None:
    """Reject queues that would deadlock or skip work: each step once, shards before their merge."""
    index = {t.key: e for e, t in enumerate(plan.tasks)}
    if len(index) != len(plan.tasks):
        raise ZipMoEError("plan names the same expert twice")
    shards_seen = [0] * len(plan.tasks)
    merged = [False] * len(plan.tasks)
    for s in plan.decode_queue:
        e = index.get(s.key)
        if e is None or merged[e] or not plan.tasks[e].decodes or not -1 <= s.shard < plan.tasks[e].k:
            raise ZipMoEError(f"plan's decode_queue has a bad step {s} (unknown expert, or after its merge)")
        if s.shard == MERGE:
            merged[e] = True
        else:
            shards_seen[e] += 1
    reads = [(index.get(s.key), s.plane) for s in plan.io_queue]
    want = [(e, p) for e, t in enumerate(plan.tasks) for p, on in ((Plane.E, t.reads_e), (Plane.SM, t.reads_sm)) if on]
    if sorted(reads, key=str) != sorted(want, key=str) or any(
            shards_seen[e] != (t.k if t.decodes else 0) for e, t in enumerate(plan.tasks)):
        raise ZipMoEError("plan's queues must list every read and every shard of its tasks exactly once")


def _timings(run: _Run, delivered: list[int], stall: float) -> PlanTimings:
    experts = tuple(
        ExpertTimes(run.plan.tasks[e].key, run.io_start[e], run.io_end[e], run.dec_start[e], run.dec_end[e],
                    run.ready[e], run.delivered[e], math.nan) for e in delivered)
    return PlanTimings(time.perf_counter() - run.t0, run.io_busy, run.decode_busy, stall, experts, run.t0)
