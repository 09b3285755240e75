"""StripedReads: one read split into concurrent aligned parts must return exactly the bytes one read would,
raise the same errors, and never leave a part writing into the buffer after it returns or raises."""

from __future__ import annotations

import functools
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from zipmoe.errors import ZipMoEError
from zipmoe.store import aligned, reader
from zipmoe.store.aligned import ALIGN, StripedReads, aligned_buffer, open_direct, read_direct_into, span_bytes
from zipmoe.store.format import DataFileSizeError
from zipmoe.store.reader import StoreReader


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = np.random.default_rng(1).integers(0, 256, 300 * ALIGN + 123, dtype=np.uint8).tobytes()
    path = tmp_path / "experts.bin"
    path.write_bytes(data)
    return path, data


def test_parts_return_exactly_the_requested_bytes(data_file) -> None:
    path, data = data_file
    fd, _ = open_direct(path)
    striped = StripedReads(3, min_part=ALIGN)
    rng = np.random.default_rng(0)
    try:
        for _ in range(200):
            offset = int(rng.integers(0, len(data) - 1))
            length = int(rng.integers(1, len(data) - offset + 1))
            buf = aligned_buffer(span_bytes(offset, length))
            view = striped.read_into(fd, offset, length, buf)
            assert view.tobytes() == data[offset : offset + length], (offset, length)
        assert striped.read_into(fd, len(data) - 5, 5, aligned_buffer(2 * ALIGN)).tobytes() == data[-5:]
    finally:
        striped.close()
        os.close(fd)


def test_a_read_past_the_end_raises_like_an_unstriped_one(data_file) -> None:
    path, data = data_file
    fd, _ = open_direct(path)
    striped = StripedReads(2, min_part=ALIGN)
    try:
        buf = aligned_buffer(span_bytes(0, len(data) + ALIGN))
        with pytest.raises(EOFError):
            read_direct_into(fd, 0, len(data) + ALIGN, buf)
        with pytest.raises(EOFError):
            striped.read_into(fd, 0, len(data) + ALIGN, buf)
    finally:
        striped.close()
        os.close(fd)


def test_a_failing_part_is_raised_only_after_every_part_has_finished(data_file, monkeypatch) -> None:
    path, _ = data_file
    fd, _ = open_direct(path)
    finished: list[int] = []
    real = aligned.read_direct_into

    def flaky(fd_: int, offset: int, length: int, buf: np.ndarray) -> np.ndarray:
        if offset == 0:  # the caller's part fails at once
            raise OSError("disk on fire")
        time.sleep(0.05)  # the helpers' parts are still writing into buf
        out = real(fd_, offset, length, buf)
        finished.append(offset)
        return out

    monkeypatch.setattr(aligned, "read_direct_into", flaky)
    striped = StripedReads(3, min_part=ALIGN)
    try:
        with pytest.raises(OSError, match="disk on fire"):
            striped.read_into(fd, 0, 64 * ALIGN, aligned_buffer(64 * ALIGN))
        assert len(finished) == 2, "returned while a part could still write into the buffer"
    finally:
        striped.close()
        os.close(fd)


def test_store_reads_striped_equal_whole_reads_and_close_joins_the_threads(pristine_store, monkeypatch) -> None:
    monkeypatch.setattr(reader, "StripedReads", functools.partial(StripedReads, min_part=ALIGN))
    before = {t.name for t in threading.enumerate()}
    with StoreReader(pristine_store) as whole, StoreReader(pristine_store, read_stripes=3) as parts:
        for entry in whole.entries.values():
            a, b = whole.read_sm_into(entry, whole.new_sm_buffer()), parts.read_sm_into(entry, parts.new_sm_buffer())
            assert a.tobytes() == b.tobytes()
            ea = whole.read_e_into(entry, aligned_buffer(whole.max_e_region_bytes))
            eb = parts.read_e_into(entry, aligned_buffer(parts.max_e_region_bytes))
            assert [v.tobytes() for v in ea] == [v.tobytes() for v in eb]
        assert any(t.name.startswith("zipmoe-stripe") for t in threading.enumerate()), "nothing was striped"
    assert {t.name for t in threading.enumerate()} <= before


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(Exception, match="stripes >= 2"):
        StripedReads(1)


def test_concurrent_callers_each_get_their_own_helpers(data_file, monkeypatch) -> None:
    """The engine's two I/O threads and its prefetcher read at once: one read's parts must not queue behind
    another's (that would leave its last part running alone, which striping exists to avoid)."""
    path, _ = data_file
    fd, _ = open_direct(path)
    all_parts = threading.Barrier(6, timeout=20)  # passes only if 3 reads × 2 parts are in flight at once
    real = aligned.read_direct_into

    def slow(fd_: int, offset: int, length: int, buf: np.ndarray) -> np.ndarray:
        all_parts.wait()
        return real(fd_, offset, length, buf)

    monkeypatch.setattr(aligned, "read_direct_into", slow)
    striped = StripedReads(2, min_part=ALIGN, callers=3)
    errors: list[BaseException] = []

    def one() -> None:
        try:
            striped.read_into(fd, 0, 64 * ALIGN, aligned_buffer(64 * ALIGN))
        except BaseException as exc:  # asserted on below
            errors.append(exc)

    readers = [threading.Thread(target=one) for _ in range(3)]
    try:
        for t in readers:
            t.start()
        for t in readers:
            t.join()
        assert not errors, f"the six parts were never in flight together: {errors[0]!r}"
    finally:
        striped.close()
        os.close(fd)


def test_striped_store_reads_fail_like_whole_ones(store, monkeypatch) -> None:
    """A file truncated under an open store: DataFileSizeError naming the expert; a read racing close():
    the "store is closed" error, not the thread pool's RuntimeError."""
    monkeypatch.setattr(reader, "StripedReads", functools.partial(StripedReads, min_part=ALIGN))
    with StoreReader(store, read_stripes=2) as r:
        entry = max(r.entries.values(), key=lambda e: e.sm.offset + e.sm.length)
        os.truncate(store / "experts.bin", entry.sm.offset + entry.sm.length // 2)
        with pytest.raises(DataFileSizeError, match=str(entry.key.expert)):
            r.read_sm_into(entry, r.new_sm_buffer())
        r._striped.close()  # what a concurrent close() does first
        with pytest.raises(ZipMoEError, match="closed"):
            r.read_sm_into(entry, r.new_sm_buffer())
