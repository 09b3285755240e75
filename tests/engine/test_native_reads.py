"""Native reads (store/native_reads.py, load(native_reads=True)): a layer's reads and the prefetcher's issued
from native code must bring the same bytes as the Python reads, keep logits torch.equal to transformers, report
corruption and truncation as the Python path does, stop when called off, and leave no thread or descriptor
behind."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
import transformers
from tests.engine.engine_helpers import (
    assert_cache_holds_the_stored_planes,
    budgets,
    padded_inputs,
    prefetch_budget,
    settle_prefetch,
)
from tests.tiny_models import build_tiny_checkpoint

from zipmoe.convert import convert
from zipmoe.errors import ChecksumError, ZipMoEError
from zipmoe.models.load import load, unload
from zipmoe.store.aligned import ALIGN, aligned_buffer, read_direct_into
from zipmoe.store.format import DATA_NAME, DataFileSizeError
from zipmoe.store.native_reads import (
    COMPLETE,
    FAILED,
    SHORT,
    STOPPED,
    NativeReadChannel,
    ReadBatch,
    available,
    stoppable_reader,
)
from zipmoe.store.reader import StoreReader
from zipmoe.types import ExpertKey

pytestmark = pytest.mark.skipif(not available(), reason="native reads need Linux")
_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    ckpt = build_tiny_checkpoint("qwen2_moe", root / "hf", seed=11)
    return ckpt, convert(ckpt, root / "store", progress=False, workers=2)


def _batch(fd: int, spans: list[tuple[int, int]], bufs: list[np.ndarray], on_done) -> ReadBatch:
    col = lambda j: np.array([s[j] for s in spans], dtype=np.int64)  # noqa: E731
    return ReadBatch(fd, col(0), col(1), np.array([b.ctypes.data for b in bufs], dtype=np.int64), on_done)


@pytest.mark.parametrize("streams", [1, 2, 3])
def test_the_channel_reads_what_read_direct_into_reads_and_posts_one_completion_per_read(tmp_path, streams):
    path = tmp_path / "data.bin"
    data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    rng = np.random.default_rng(1)
    spans = [(int(rng.integers(0, 600)) * ALIGN, int(rng.integers(1, 64)) * ALIGN) for _ in range(9)]
    spans.append(((3 << 20) - ALIGN, 2 * ALIGN))  # runs past the end of the file: a short read
    bufs = [aligned_buffer(n) for _, n in spans]
    done: list[tuple[int, int, float, float]] = []
    finished = threading.Event()

    def on_done(i, got, t0, t1):
        done.append((i, got, t0, t1))
        if len(done) == len(spans):
            finished.set()

    fd = os.open(path, os.O_RDONLY)
    channel = NativeReadChannel(streams)
    try:
        channel.submit(_batch(fd, spans, bufs, on_done))
        assert finished.wait(30)
    finally:
        channel.close()
        os.close(fd)
    assert sorted(i for i, *_ in done) == list(range(len(spans)))
    for i, got, t0, t1 in done:
        start, n = spans[i]
        want = min(n, len(data) - start)
        assert got == want
        assert np.array_equal(bufs[i][:got], data[start : start + got])
        assert 0 < t0 <= t1
    assert channel.short_or_failed == 1  # the read past the end
    ref, fd = aligned_buffer(spans[0][1]), os.open(path, os.O_RDONLY)
    try:
        assert np.array_equal(read_direct_into(fd, *spans[0], ref), bufs[0])
    finally:
        os.close(fd)


def test_a_stream_that_fails_posts_its_reads_failed_instead_of_stranding_them(tmp_path, monkeypatch):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(4 * ALIGN))
    channel = NativeReadChannel(1)
    got = []

    def broken(*args):
        raise RuntimeError("dispatch failed")

    monkeypatch.setattr(channel, "_read", broken)
    fd = os.open(path, os.O_RDONLY)
    try:
        channel.submit(_batch(fd, [(0, ALIGN), (ALIGN, ALIGN)], [aligned_buffer(ALIGN)] * 2,
                              lambda i, n, *_: got.append((i, n))))
    finally:
        channel.close()
        os.close(fd)
    assert sorted(got) == [(0, -1), (1, -1)]
    assert not channel._batches


def test_a_failed_read_posts_minus_one_and_close_joins_every_thread(tmp_path):
    before = threading.active_count()
    channel = NativeReadChannel(2)
    got = []
    fd = os.open(tmp_path, os.O_RDONLY)  # a directory: pread fails with EISDIR
    try:
        channel.submit(_batch(fd, [(0, ALIGN)], [aligned_buffer(ALIGN)], lambda i, n, *_: got.append(n)))
    finally:
        channel.close()  # waits for the batch and hands its completion on first
        os.close(fd)
    assert got == [-1]
    assert threading.active_count() == before
    with pytest.raises(ZipMoEError, match="closed"):
        channel.submit(_batch(fd, [(0, ALIGN)], [aligned_buffer(ALIGN)], lambda *a: None))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=_GPU)])
def test_native_reads_keep_logits_equal_and_read_the_same_bytes(converted, device):
    ckpt, store = converted
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt, experts_implementation="grouped_mm").to(device)
    budget = budgets(store)["minimum"]
    bytes_read = {}
    for native in (False, True):
        model = load(store, device=device, memory_budget=budget, experts_implementation="grouped_mm", workers=2,
                     native_reads=native)
        try:
            for batch in (1, 4):
                ids, mask = (t.to(device) for t in padded_inputs(batch))
                with torch.no_grad():
                    want = ref(input_ids=ids, attention_mask=mask).logits
                    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, want)
                gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
                           return_dict_in_generate=True)
                out = model.generate(input_ids=ids, attention_mask=mask, **gen)
                ref_out = ref.generate(input_ids=ids, attention_mask=mask, **gen)
                assert torch.equal(out.sequences, ref_out.sequences)
                assert all(torch.equal(a, b) for a, b in zip(out.logits, ref_out.logits, strict=True))
            stats = model.zipmoe_engine.stats.snapshot()
            assert stats["hits"]["MISS"] > 0, "the budget forced no reads"
            bytes_read[native] = stats["bytes_read"]
            channel = model.zipmoe_engine.executor._native
            assert (channel is not None) == native
            if native:  # every read came through the native path, none redone in Python
                assert channel.short_or_failed == 0
        finally:
            unload(model)
    assert bytes_read[True] == bytes_read[False]


def _corrupt_every_sm_plane(store, tmp_path):
    """A copy of the store whose every SM plane but the first (engine.warmup reads it at load) has one byte
    flipped; E regions intact."""
    import shutil

    from zipmoe.store.reader import StoreReader

    bad = tmp_path / "bad"
    shutil.copytree(store, bad)
    with StoreReader(bad) as r:
        offsets = [e.sm.offset for e in r.entries.values()][1:]
    with open(bad / DATA_NAME, "r+b") as f:
        for off in offsets:
            f.seek(off + 5)
            b = f.read(1)
            f.seek(off + 5)
            f.write(bytes([b[0] ^ 0x40]))
    return bad


def test_a_corrupt_plane_read_natively_raises_naming_it(converted, tmp_path):
    _, store = converted
    bad = _corrupt_every_sm_plane(store, tmp_path)
    model = load(bad, memory_budget=budgets(store)["minimum"], workers=2, native_reads=True, preload=False)
    try:
        with pytest.raises(ChecksumError, match=r"SM plane.*checksum mismatch"), torch.no_grad():
            model(input_ids=padded_inputs(1)[0])
    finally:
        unload(model)


def test_a_data_file_truncated_while_open_is_reported_not_computed_with(converted, tmp_path):
    """The native read comes up short; the executor redoes it in Python, which names the truncation."""
    import shutil

    _, store = converted
    cut = tmp_path / "cut"
    shutil.copytree(store, cut)
    model = load(cut, memory_budget=budgets(store)["minimum"], workers=2, native_reads=True, preload=False)
    try:
        os.truncate(cut / DATA_NAME, 3 * ALIGN)
        with pytest.raises(DataFileSizeError, match="truncated"), torch.no_grad():
            model(input_ids=padded_inputs(1)[0])
        assert model.zipmoe_engine.executor._native.short_or_failed > 0  # it was the native read that met it
    finally:
        unload(model)


def test_load_unload_with_native_reads_leaks_no_threads_or_fds(converted):
    _, store = converted
    threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
    for _ in range(2):
        model = load(store, memory_budget=budgets(store)["minimum"], workers=2, native_reads=True)
        with torch.no_grad():
            model(input_ids=padded_inputs(1)[0])
        unload(model)
    assert threading.active_count() == threads
    assert len(os.listdir("/proc/self/fd")) == fds


@pytest.mark.parametrize("conflict", [{"read_bytes_per_s": 1e8}, {"read_stripes": 2}])
def test_native_reads_refuse_what_they_cannot_do(converted, conflict):
    _, store = converted
    with pytest.raises(ZipMoEError, match="native_reads=True is not possible here"):
        load(store, workers=2, native_reads=True, **conflict)


def test_closing_a_layer_early_waits_for_its_native_reads(converted, monkeypatch):
    """Every read a cancelled layer handed to the channel has completed and been handed on (so nothing writes
    into the slots the lease gives back) by the time closing the layer returns; the next call is still exact."""
    import time

    from zipmoe.engine.engine import LayerOps

    ckpt, store = converted
    landed, finished = LayerOps.read_landed, []

    def slow_landed(self, key, sm, seconds):
        time.sleep(0.1)
        landed(self, key, sm, seconds)
        finished.append(time.perf_counter())

    monkeypatch.setattr(LayerOps, "read_landed", slow_landed)
    model = load(store, memory_budget=budgets(store)["minimum"], workers=2, native_reads=True, preload=False)
    try:
        engine = model.zipmoe_engine
        gen = engine.experts(0, [0, 1, 2, 3])  # cold: MISS loads, two reads each
        next(gen)
        gen.close()
        closed = time.perf_counter()
        time.sleep(0.5)  # let any completion that was not waited for run late
        assert all(t <= closed for t in finished), "a read of the closed layer was handed on after the close"
        channel = engine.executor._native
        assert channel is not None and not channel._batches, "a read of the closed layer is still in flight"
        ids = padded_inputs(1)[0]
        ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    finally:
        unload(model)


def test_the_stoppable_reader_reads_what_read_direct_into_reads_and_stops_on_its_flag(tmp_path):
    path = tmp_path / "data.bin"
    data = np.random.default_rng(2).integers(0, 256, 3 << 20, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    read = stoppable_reader()
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, span, part in [(0, 5 * ALIGN, ALIGN), (7 * ALIGN, 64 * ALIGN, 4 * ALIGN), (0, 3 << 20, 1 << 20),
                                  (ALIGN, 3 * ALIGN, 8 * ALIGN)]:
            buf, flag = aligned_buffer(span), np.zeros(1, np.int64)
            assert read(fd, start, span, buf.ctypes.data, part, flag) == (span, COMPLETE)
            assert np.array_equal(buf, data[start : start + span])
            assert np.array_equal(read_direct_into(fd, start, span, aligned_buffer(span), part=part), buf)
        buf = aligned_buffer(8 * ALIGN)
        raised = np.ones(1, np.int64)  # the first part still comes in (it is asked only between parts), no more
        assert read(fd, 0, 8 * ALIGN, buf.ctypes.data, 2 * ALIGN, raised) == (2 * ALIGN, STOPPED)
        end = len(data) - ALIGN
        assert read(fd, end, 2 * ALIGN, buf.ctypes.data, ALIGN, np.zeros(1, np.int64)) == (ALIGN, SHORT)
    finally:
        os.close(fd)
    fd = os.open(tmp_path, os.O_RDONLY)  # a directory: pread fails with EISDIR
    try:
        assert read(fd, 0, ALIGN, buf.ctypes.data, ALIGN, np.zeros(1, np.int64)) == (0, FAILED)
    finally:
        os.close(fd)


def test_the_stoppable_reader_sees_a_flag_another_thread_raises_mid_read(tmp_path):
    """The native loop reads the flag again after every pread, so a read already going stops at its next part
    (the flag is raised only once the read is seen past its first 256 KiB)."""
    path, span = tmp_path / "sparse.bin", 128 << 20
    with open(path, "wb") as f:
        f.truncate(span)  # a hole: reads cost syscalls, not disk
    buf = aligned_buffer(span)
    read = stoppable_reader()
    fd = os.open(path, os.O_RDONLY)
    try:
        for _attempt in range(5):  # the whole read takes ~50 ms: a main thread preempted that long sees it end
            buf[:] = 0xFF
            flag, result = np.zeros(1, np.int64), []
            t = threading.Thread(target=lambda out=result, flag=flag: out.append(
                read(fd, 0, span, buf.ctypes.data, ALIGN, flag)))
            t.start()
            while buf[256 << 10] != 0 and t.is_alive():
                pass
            flag[0] = 1
            t.join(30)
            (got, status), = result
            if status == STOPPED:
                break
            assert (got, status) == (span, COMPLETE)
    finally:
        os.close(fd)
    assert status == STOPPED and (256 << 10) < got < span, "the read never saw the flag another thread raised"
    assert not buf[:got].any() and (buf[got:] == 0xFF).all()


@pytest.mark.parametrize("plane", ["sm", "e"])
def test_a_corrupt_plane_read_by_native_prefetch_is_dropped_never_served(converted, tmp_path, plane):
    """The engine decodes prefetched planes as verified: the native path must check the SM plane and every E
    shard itself, and drop (count as wasted) an expert whose bytes do not match, serving the others."""
    import shutil

    from zipmoe.engine.prefetch import Prefetcher

    _, store = converted
    bad_key, good_key = ExpertKey(1, 0), ExpertKey(1, 1)
    bad = tmp_path / "bad"
    shutil.copytree(store, bad)
    with StoreReader(bad) as r:
        entry = r.entries[bad_key]
        at = entry.sm.offset + 5 if plane == "sm" else entry.e_shards[-1].offset + 1
    with open(bad / DATA_NAME, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x10]))
    with StoreReader(bad) as reader:
        pf = Prefetcher(reader, 2, 1 << 20, 1 << 20, pinned=False, native=True)
        try:
            pf.hint(1, [bad_key, good_key])
            pf.disk_free()
            assert pf.wait_idle(30.0)
            got = pf.collect(1, [bad_key, good_key])
            c = pf.counters
            assert set(got) == {good_key} and (c.read, c.discarded) == (1, 1)
            assert c.wasted_bytes == entry.sm.length + (entry.e_length if plane == "e" else 0)
            good = reader.entries[good_key]
            assert np.array_equal(got[good_key][0], reader.read_sm_into(good, reader.new_sm_buffer()))
            want = reader.read_e_into(good, reader.new_e_buffer())
            assert all(np.array_equal(a, b) for a, b in zip(reader.landed_e(good, got[good_key][1]), want, strict=True))
        finally:
            pf.close()


def test_native_prefetch_reads_stop_when_called_off_refilled_or_closed(converted):
    """collect() for a layer that does not need the read, a hint that refills its slot set, and close() each
    raise the flight's flag, and only then does the (stand-in) native read stop; its bytes count as wasted."""
    import time

    from zipmoe.engine.prefetch import Prefetcher

    _, store = converted
    entered, flags = threading.Semaphore(0), []

    def held_until_flagged(fd, start, span, address, part, flag):
        flags.append(flag)
        entered.release()
        deadline = time.perf_counter() + 5
        while not flag[0] and time.perf_counter() < deadline:
            time.sleep(0.001)
        return (ALIGN, STOPPED) if flag[0] else (span, COMPLETE)

    with StoreReader(store) as reader:
        a, c, d = ExpertKey(1, 0), ExpertKey(0, 1), ExpertKey(1, 2)
        pf = Prefetcher(reader, 1, 1 << 20, 1 << 20, pinned=False, native=True)
        pf._read_parts = held_until_flagged
        try:
            pf.hint(1, [a])
            pf.disk_free()
            assert entered.acquire(timeout=5)
            t0 = time.perf_counter()
            assert pf.collect(1, [ExpertKey(1, 3)]) == {}  # layer 1 goes on without a
            assert pf.wait_idle(5.0) and time.perf_counter() - t0 < 2, "the called-off read did not stop"
            assert (pf.counters.discarded, pf.counters.bytes_read, pf.counters.wasted_bytes) == (1, ALIGN, ALIGN)
            pf.hint(1, [a])  # set 0
            pf.disk_free()
            assert entered.acquire(timeout=5)
            pf.hint(0, [c])  # the other set: a's read goes on
            assert not flags[-1][0]
            pf.hint(1, [d])  # refills a's set: a is called off
            assert flags[-1][0] == 1
            pf.disk_free()
            assert entered.acquire(timeout=5)  # d's read, which stands in for a held read at close
        finally:
            t0 = time.perf_counter()
            pf.close()
        assert time.perf_counter() - t0 < 2 and all(f[0] for f in flags), "close did not stop the reads in flight"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=_GPU)])
def test_native_prefetch_keeps_logits_equal_and_reads_what_python_prefetch_reads(converted, device):
    ckpt, store = converted
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt, experts_implementation="grouped_mm").to(device)
    ids = padded_inputs(1)[0].to(device)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    want = ref.generate(input_ids=ids, **gen)
    counted = {}
    budget = prefetch_budget(store)
    for native in (False, True):
        model = load(store, device=device, memory_budget=budget, experts_implementation="grouped_mm", workers=2,
                     prefetch=True, native_reads=native, preload=False)
        try:
            engine = model.zipmoe_engine
            settle_prefetch(engine)
            out = model.generate(input_ids=ids, **gen)
            assert torch.equal(out.sequences, want.sequences)
            assert all(torch.equal(a, b) for a, b in zip(out.logits, want.logits, strict=True))
            assert (engine.prefetcher._read_parts is not None) == native
            c = engine.prefetcher.counters.snapshot()
            assert c["used"] > 0, f"no prefetched expert was decoded (path untested): {c}"
            assert_cache_holds_the_stored_planes(engine)
            counted[native] = (c["read"], c["bytes_read"], engine.stats.snapshot()["bytes_read"])
        finally:
            unload(model)
    assert counted[True] == counted[False]
