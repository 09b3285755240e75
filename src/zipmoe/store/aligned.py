"""Page-aligned buffers and O_DIRECT reads: the one place that knows O_DIRECT's rules.

Arrow: reader -> read_direct_into(fd, offset, length, buf) -> a view of the requested bytes in buf.
O_DIRECT needs the file offset, the length and the buffer address all multiples of 4096; we round the
span out to 4096 and hand back the view of what was asked for. Any thread may call (os.preadv on a
shared fd keeps no file position). Sizes in bytes.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from zipmoe.errors import ZipMoEError

ALIGN = 4096  # O_DIRECT granularity used by the store (FORMAT.md §2)
log = logging.getLogger(__name__)


def align_up(n: int) -> int:
    """Smallest multiple of ALIGN that is >= n."""
    return -(-n // ALIGN) * ALIGN


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A zeroed, page-aligned uint8 buffer of at least nbytes (rounded up to 4096), from an anonymous mmap."""
    return np.frombuffer(mmap.mmap(-1, max(ALIGN, align_up(nbytes))), dtype=np.uint8)


def span_bytes(offset: int, length: int) -> int:
    """Buffer bytes read_direct_into needs for [offset, offset+length): the span rounded out to 4096."""
    return align_up(offset + length) - (offset - offset % ALIGN)


def open_direct(path: str | os.PathLike, *, required: bool = False) -> tuple[int, bool]:
    """Open read-only with O_DIRECT (no page cache) -> (fd, True); else fall back to buffered -> (fd, False).

    tmpfs and some FUSE file systems refuse O_DIRECT at open or at the first read; we probe both.
    """
    flag = getattr(os, "O_DIRECT", 0)
    if flag:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flag)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        else:
            if _direct_read_works(fd):
                return fd, True
            os.close(fd)
    if required:
        raise ZipMoEError(
            f"O_DIRECT is not supported for {os.fspath(path)!r} on this file system; "
            "open the store with direct_io=None (auto) or False"
        )
    log.warning(
        "O_DIRECT is not supported for %s; using buffered reads (the page cache will hold expert bytes)",
        os.fspath(path),
    )
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC), False


def _direct_read_works(fd: int) -> bool:
    if os.fstat(fd).st_size == 0:
        return True
    try:
        os.preadv(fd, [memoryview(aligned_buffer(ALIGN))], 0)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    return True


def aligned_extent(offset: int, length: int, buf: np.ndarray) -> tuple[int, int]:
    """(file start, bytes) of the 4096-aligned read covering [offset, offset+length) into buf; ValueError if
    buf is not a contiguous uint8 array of at least that many bytes. The view of the asked-for bytes is then
    buf[offset - start : offset - start + length]."""
    start = offset - offset % ALIGN
    span = align_up(offset + length) - start
    if buf.ndim != 1 or buf.dtype != np.uint8 or buf.nbytes < span or not buf.flags.c_contiguous:
        raise ValueError(
            f"read of {length} bytes at {offset} needs a contiguous uint8 buffer of {span} bytes, "
            f"got {buf.dtype} {buf.shape}"
        )
    return start, span


class ReadStopped(Exception):
    """read_direct_into gave up between two parts because its `stop()` said so (the bytes are incomplete)."""

    def __init__(self, message: str, bytes_read: int):
        super().__init__(message)
        self.bytes_read = bytes_read  # what the disk delivered before the stop


def read_direct_into(fd: int, offset: int, length: int, buf: np.ndarray, *, part: int | None = None,
                     stop: Callable[[], bool] | None = None) -> np.ndarray:
    """Read [offset, offset+length) into buf with 4096-aligned I/O; return the view of exactly those bytes.

    buf must be a 1-D uint8 array from aligned_buffer (or other page-aligned memory) of at least
    span_bytes(offset, length). Raises EOFError if the file ends before offset+length.
    part: read at most this many bytes (a multiple of 4096) per call, asking `stop()` before each call after
    the first; ReadStopped when it answers True. A read that may turn out unwanted (prefetch) then costs at
    most one part of disk time after it is called off.
    """
    start, span = aligned_extent(offset, length, buf)
    if part is not None and (part <= 0 or part % ALIGN):
        raise ValueError(f"read parts must be positive multiples of {ALIGN} bytes, got {part}")
    view = buf[:span]
    got = 0
    while got < span:
        if got and stop is not None and stop():
            raise ReadStopped(f"read of {length} bytes at {offset} stopped after {got}", got)
        end = span if part is None else min(span, got + part)
        try:
            n = os.preadv(fd, [memoryview(view[got:end])], start + got)
        except OSError as exc:
            if exc.errno == errno.EINVAL and buf.ctypes.data % ALIGN:
                raise ValueError(
                    "O_DIRECT reads need a page-aligned buffer: allocate it with aligned_buffer()"
                ) from exc
            raise
        if n == 0:
            break
        got += n
    lo = offset - start
    if got < lo + length:
        raise EOFError(f"file ends at {start + got}, before byte {offset + length}")
    return view[lo : lo + length]


class StripedReads:
    """Reads one span as up to `stripes` aligned parts at once: the caller's thread reads the first part,
    helper threads ("zipmoe-stripe-i") the rest, and read_into returns once every part is in.

    Why: a layer has only 2–3 plane reads, so its last one often runs alone on one I/O thread; on a disk
    that needs several requests in its queue to reach full speed, splitting keeps two there. Measured on
    both machines we have, that is not the case (scripts/disk_probe.py: one O_DIRECT stream reads as fast
    as two), and striping did not change the engine's TPOT on the device (BENCHMARKS.md, fifth session), so
    the engine stripes only when asked (load(read_stripes=2)). Spans under 2 × min_part bytes are read
    whole (short reads gain nothing).
    """

    def __init__(self, stripes: int, min_part: int = 4 << 20, callers: int = 1):
        """callers: threads that may read at once (each gets its own stripes - 1 helpers, so one read's parts
        never queue behind another's)."""
        if stripes < 2 or min_part < ALIGN or callers < 1:
            raise ZipMoEError(f"striped reads need stripes >= 2, min_part >= {ALIGN} and callers >= 1, got "
                              f"{stripes}, {min_part}, {callers}")
        self.stripes, self.min_part = stripes, min_part
        self._pool = ThreadPoolExecutor(max_workers=(stripes - 1) * callers, thread_name_prefix="zipmoe-stripe")

    def read_into(self, fd: int, offset: int, length: int, buf: np.ndarray) -> np.ndarray:
        """read_direct_into(fd, offset, length, buf), striped; the same contract and errors. No part is
        still writing into buf when this returns or raises. RuntimeError once closed."""
        start = offset - offset % ALIGN
        span = align_up(offset + length) - start
        parts = min(self.stripes, span // self.min_part)
        if parts < 2:
            return read_direct_into(fd, offset, length, buf)
        if buf.ndim != 1 or buf.nbytes < span:
            raise ValueError(f"read of {length} bytes at {offset} needs a buffer of {span} bytes, got {buf.shape}")
        cuts = [start + span * i // parts // ALIGN * ALIGN for i in range(parts)] + [offset + length]
        helpers = []
        try:
            for i in range(1, parts):
                helpers.append(self._pool.submit(read_direct_into, fd, cuts[i], cuts[i + 1] - cuts[i],
                                                 buf[cuts[i] - start:]))
            read_direct_into(fd, offset, cuts[1] - offset, buf)
        finally:
            failures = [f.exception() for f in helpers]  # waits for every part submitted
        for exc in failures:
            if exc is not None:
                raise exc
        lo = offset - start
        return buf[lo : lo + length]

    def close(self) -> None:
        """Join the helper threads (idempotent)."""
        self._pool.shutdown(wait=True)
