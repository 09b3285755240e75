"""GIL-free reads: a layer's plane reads issued back to back by native code, completions posted on a pipe.

Arrow: executor ──submit(ReadBatch)──▶ stream threads ("zipmoe-nread-i") each run their share of the batch in
one numba call (nogil, libc pread into the caller's buffers) ──8-byte tag per read──▶ pipe ──▶ the completion
thread ("zipmoe-nread-done") calls batch.on_done(i, bytes, t0, t1) in completion order.

Why by hand (numba + ctypes, not os.preadv on Python threads): a Python thread whose read returns must take
the GIL back before it can issue its next read, and the compute thread runs the model's Python most of the
time. A layer's burst of four plane reads read at 1.55 GB/s alone and 1.24 beside a thread running Python
(scripts/burst_reads.py on the device, BENCHMARKS.md thirteenth session). Here the next read is issued in
native code at once; only the completion thread, which hands results on, waits for the GIL. The disk never
does. Linux/POSIX only (libc pread and write; CLOCK_MONOTONIC, which time.perf_counter also reads).
Measured in the engine on the device, it did not change TPOT (a tie at batch 1 and 16, BENCHMARKS.md thirteenth
session): the second Python I/O thread already kept a read at the disk, and the GIL wait after a layer's last
read only moves here. So load() leaves it off by default.

Contract: every submitted read posts exactly one completion, also when it failed (bytes -1: the caller redoes
it in Python to raise the proper error) or came up short (bytes < span). A batch, once submitted, runs to its
end: cancelling is the caller's business (it skips the completions); nothing writes into a batch's buffers
after its last completion has been handed on. Sizes in bytes.

stoppable_reader() is the other entry point: one read, issued by its calling thread in parts from native code,
that stops at a part boundary once a flag is set (the prefetcher's reads, engine/prefetch.py).
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from zipmoe.errors import ZipMoEError
from zipmoe.store.aligned import ALIGN

log = logging.getLogger(__name__)
_TAG = 8  # bytes per completion message on the pipe (<= PIPE_BUF, so each write is atomic)
_CLOSE = -1  # the tag that stops the completion thread
_kernel = None


def available() -> bool:
    """True where the native channel can run: Linux with libc's pread (numba is a dependency anyway)."""
    return sys.platform.startswith("linux")


def _libc():
    """libc's pread, write and clock_gettime for numba to call, pointers as size_t (the same 64-bit register as a
    void*, and what numba can pass from an int64 array)."""
    libc = ctypes.CDLL(None)
    pread, write, clock = libc.pread, libc.write, libc.clock_gettime
    pread.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int64]
    pread.restype = ctypes.c_ssize_t
    write.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t]
    write.restype = ctypes.c_ssize_t
    clock.argtypes = [ctypes.c_int, ctypes.c_size_t]
    clock.restype = ctypes.c_int
    return pread, write, clock


def _compiled():
    """read_list, compiled at first use (not cached on disk: numba does not cache functions calling ctypes)."""
    global _kernel
    if _kernel is None:
        import numba

        pread, write, clock = _libc()
        monotonic = 1  # CLOCK_MONOTONIC on Linux

        def read_list(fd, order, starts, spans, addrs, got, t_ns, tags, pipe_fd):  # pragma: no cover (native)
            ts = np.empty(2, np.int64)
            ts_at = ts.ctypes.data
            for j in range(order.shape[0]):
                i = order[j]
                clock(monotonic, ts_at)
                t_ns[2 * i] = ts[0] * 1000000000 + ts[1]
                done, n = 0, 1
                while done < spans[i]:
                    n = pread(fd, addrs[i] + done, spans[i] - done, starts[i] + done)
                    if n <= 0:
                        break
                    done += n
                got[i] = -1 if n < 0 else done
                clock(monotonic, ts_at)
                t_ns[2 * i + 1] = ts[0] * 1000000000 + ts[1]
                while write(pipe_fd, tags.ctypes.data + 8 * i, 8) != 8:  # EINTR only: the pipe never fills
                    pass
            return 0

        _kernel = numba.njit(nogil=True)(read_list)
    return _kernel


# what read_parts reports (its second value; the kernel takes them as compile-time constants)
COMPLETE, STOPPED, SHORT, FAILED = 0, 1, 2, 3
_parts_kernel = None


def _flag_loader():
    """load_flag(address) -> int64: an atomic (monotonic) load, so the read loop fetches the flag from memory on
    every pass, whatever the compiler could prove about the loop (a plain load may legally be hoisted)."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def load_flag(typingctx, address):
        def codegen(context, builder, signature, args):
            ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
            return builder.load_atomic(ptr, "monotonic", 8)

        return types.int64(types.uintp), codegen

    return load_flag


def stoppable_reader() -> Callable[[int, int, int, int, int, np.ndarray], tuple[int, int]]:
    """read_parts(fd, start, span, address, part, flag) -> (bytes read, COMPLETE | STOPPED | SHORT | FAILED),
    compiled now (about a second, once per process).

    It reads [start, start + span) of fd into the buffer at `address` in reads of at most `part` bytes (a
    positive multiple of 4096), in native code without the GIL, and stops before any part but the first once
    flag[0] != 0 (flag: a 1-element int64 array another thread sets). For the prefetcher's reads, which must
    stop at a part boundary when their guess turns out wrong, and whose Python twin (aligned.read_direct_into
    with stop=) waits for the GIL between parts while the compute thread runs the model's Python, the time
    prefetch reads in. A pread that fails (EINTR included) ends the read as FAILED: the caller drops it."""
    global _parts_kernel
    if not available():
        raise ZipMoEError("native reads need Linux (libc pread); load(native_reads=False) reads in Python")
    if _parts_kernel is None:
        import numba

        pread, load_flag = _libc()[0], _flag_loader()

        def read_parts(fd, start, span, addr, part, flag_at):  # pragma: no cover (native)
            done = 0
            while done < span:
                if done and load_flag(flag_at) != 0:
                    return done, STOPPED
                n = pread(fd, addr + done, min(part, span - done), start + done)
                if n < 0:
                    return done, FAILED
                if n == 0:
                    return done, SHORT
                done += n
            return done, COMPLETE

        kernel = numba.njit("UniTuple(int64, 2)(int64, int64, int64, uint64, int64, uint64)", nogil=True)(read_parts)
        _parts_kernel = kernel
    kernel = _parts_kernel

    def read(fd: int, start: int, span: int, address: int, part: int, flag: np.ndarray) -> tuple[int, int]:
        if part <= 0 or part % ALIGN:
            raise ValueError(f"read parts must be positive multiples of {ALIGN} bytes, got {part}")
        if flag.dtype != np.int64 or flag.size < 1:
            raise ValueError(f"the stop flag must be an int64 array, got {flag.dtype} {flag.shape}")
        return kernel(fd, start, span, address, part, flag.ctypes.data)

    return read


@dataclass(eq=False)
class ReadBatch:
    """Reads into caller-owned buffers: read i fills [starts[i], starts[i] + spans[i]) of fd at addrs[i]
    (int64 arrays of one length). The buffers must stay alive and unread by others until read i completes."""

    fd: int
    starts: np.ndarray
    spans: np.ndarray
    addrs: np.ndarray
    on_done: Callable[[int, int, float, float], None]  # (i, bytes read or -1, start s, end s): perf_counter time
    got: np.ndarray = field(init=False)
    t_ns: np.ndarray = field(init=False)
    tags: np.ndarray = field(init=False)
    left: int = field(init=False)
    submitted: bool = field(init=False)

    @classmethod
    def of(cls, targets: list[tuple[int, int, int, int]], on_done: Callable[[int, int, float, float], None]
           ) -> ReadBatch:
        """From (fd, file start, bytes, buffer address) per read, all of one fd."""
        fds = {t[0] for t in targets}
        if len(fds) != 1:
            raise ZipMoEError(f"a read batch reads one file, got descriptors {sorted(fds)}")
        starts, spans, addrs = (np.array(c, dtype=np.int64) for c in zip(*(t[1:] for t in targets), strict=True))
        return cls(fds.pop(), starts, spans, addrs, on_done)

    def __post_init__(self) -> None:
        n = len(self.starts)
        for name in ("starts", "spans", "addrs"):
            a = getattr(self, name)
            if a.dtype != np.int64 or a.ndim != 1 or a.shape[0] != n or not a.flags.c_contiguous:
                raise ValueError(f"a read batch needs one int64 start, span and address per read (1-D, "
                                 f"contiguous); {name} is {a.dtype} {a.shape} for {n} reads")
        self.submitted = False
        self.got = np.zeros(n, np.int64)
        self.t_ns = np.zeros(2 * n, np.int64)
        self.tags = np.zeros(n, np.int64)  # set by submit: (batch id << 32) | i
        self.left = n


class NativeReadChannel:
    """`streams` native reading threads and one completion thread; batches run in submit order. A batch's reads
    are dealt to the streams in order, each to the stream with the fewest bytes so far (so the first reads of
    the batch start at once, one per stream)."""

    def __init__(self, streams: int):
        if streams < 1:
            raise ZipMoEError(f"a native read channel needs at least one stream, got streams={streams}")
        if not available():
            raise ZipMoEError("native reads need Linux (libc pread); load(native_reads=False) reads in Python")
        self._read = _compiled()
        none = np.zeros(0, np.int64)
        self._read(-1, none, none, none, none, none, none, none, -1)  # compile now: a failure shows at load
        self._rfd, self._wfd = os.pipe()
        self._batches: dict[int, ReadBatch] = {}
        self._lock = threading.Lock()
        self._next_id = 0
        self._queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(streams)]
        self._threads = [threading.Thread(target=self._stream_loop, args=(q,), name=f"zipmoe-nread-{s}", daemon=True)
                         for s, q in enumerate(self._queues)]
        self._done_thread = threading.Thread(target=self._done_loop, name="zipmoe-nread-done", daemon=True)
        self._closed = False
        self.short_or_failed = 0  # completions with fewer bytes than asked (a test asserts the fast path ran)
        for t in (*self._threads, self._done_thread):
            t.start()

    def submit(self, batch: ReadBatch) -> None:
        """Start the batch's reads (after the batches submitted before it, per stream)."""
        n = len(batch.starts)
        if batch.submitted:
            raise ZipMoEError("a read batch runs once: make a new ReadBatch")
        if n == 0:
            return
        loads = [0] * len(self._queues)
        orders: list[list[int]] = [[] for _ in self._queues]
        for i, span in enumerate(batch.spans.tolist()):
            s = loads.index(min(loads))
            orders[s].append(i)
            loads[s] += span
        with self._lock:  # one lock with close(): no batch is queued behind a stream's stop sentinel
            if self._closed:
                raise ZipMoEError("the native read channel is closed")
            bid, self._next_id = self._next_id, (self._next_id + 1) & 0x7FFFFFFF
            batch.submitted = True
            batch.tags[:] = (np.int64(bid) << 32) | np.arange(n, dtype=np.int64)
            self._batches[bid] = batch
            for q, order in zip(self._queues, orders, strict=True):
                if order:
                    q.put((batch, np.asarray(order, dtype=np.int64)))

    def close(self) -> None:
        """Let every submitted batch finish, hand on its completions, then join the threads (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for q in self._queues:
                q.put(None)
        for t in self._threads:
            t.join()
        os.write(self._wfd, np.int64(_CLOSE).tobytes())
        self._done_thread.join()
        os.close(self._rfd)
        os.close(self._wfd)

    def _stream_loop(self, q: queue.SimpleQueue) -> None:
        while (item := q.get()) is not None:
            b, order = item
            try:
                self._read(b.fd, order, b.starts, b.spans, b.addrs, b.got, b.t_ns, b.tags, self._wfd)
            except BaseException:  # only before the loop runs (dispatch): post every read failed, never strand it
                log.exception("zipmoe: a native read stream failed; its reads are redone in Python")
                b.got[order] = -1
                os.write(self._wfd, b.tags[order].tobytes())

    def _done_loop(self) -> None:
        pending = b""
        while True:
            pending += os.read(self._rfd, 512 * _TAG)
            whole = len(pending) - len(pending) % _TAG
            tags, pending = np.frombuffer(pending[:whole], np.int64).tolist(), pending[whole:]
            for tag in tags:
                if tag == _CLOSE:
                    return
                try:
                    self._hand_on(tag)
                except BaseException:  # the caller's handler reports its own failures; never lose this thread
                    log.exception("zipmoe: a native read's completion handler failed")

    def _hand_on(self, tag: int) -> None:
        bid, i = tag >> 32, tag & 0xFFFFFFFF
        with self._lock:
            batch = self._batches[bid]
            batch.left -= 1
            if batch.left == 0:
                del self._batches[bid]
        got = int(batch.got[i])
        if got != batch.spans[i]:
            self.short_or_failed += 1
            if self.short_or_failed == 1:
                log.warning("zipmoe: a native read came back %s (of %d bytes); such reads are redone in Python",
                            "failed" if got < 0 else f"short ({got} bytes)", batch.spans[i])
        batch.on_done(i, got, batch.t_ns[2 * i] * 1e-9, batch.t_ns[2 * i + 1] * 1e-9)
