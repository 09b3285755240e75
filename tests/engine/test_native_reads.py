"""Native reads (store/native_reads.py, load(native_reads=True)): a layer's reads issued from native code
must bring the same bytes as the Python reads, keep logits torch.equal to transformers, report corruption and
truncation as the Python path does, and leave no thread or descriptor behind."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
import transformers
from tests.engine.engine_helpers import budgets, padded_inputs
from tests.tiny_models import build_tiny_checkpoint

from zipmoe.convert import convert
from zipmoe.errors import ChecksumError, ZipMoEError
from zipmoe.models.load import load, unload
from zipmoe.store.aligned import ALIGN, aligned_buffer, read_direct_into
from zipmoe.store.format import DATA_NAME, DataFileSizeError
from zipmoe.store.native_reads import NativeReadChannel, ReadBatch, available

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
