"""Engine safety: corruption met during generation raises an error naming the chunk (never wrong
numbers), and load/unload leaks no threads or file descriptors; budget accounting holds."""

from __future__ import annotations

import functools
import os
import shutil
import threading

import numpy as np
import pytest
import torch
import transformers
from tests.tiny_models import build_tiny_checkpoint

from zipmoe.convert import convert
from zipmoe.errors import BudgetTooSmallError, ChecksumError, ZipMoEError
from zipmoe.models.load import load, unload
from zipmoe.planner.profile_io import stats_path
from zipmoe.store import reader as reader_mod
from zipmoe.store.aligned import ALIGN, StripedReads
from zipmoe.store.reader import StoreReader
from zipmoe.types import ExpertKey, State


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    ckpt = build_tiny_checkpoint("qwen3_moe", root / "hf", seed=5)
    return convert(ckpt, root / "store", progress=False, workers=2)


def _ids():
    return torch.randint(3, 150, (2, 12), generator=torch.Generator().manual_seed(0))


def test_corrupt_chunk_during_generation_names_it(store, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(store, bad)
    with StoreReader(bad) as r:
        entry = r.entries[ExpertKey(1, 2)]
        offset = entry.e_shards[0].offset + entry.e_shards[0].length // 2
    with open(bad / "experts.bin", "r+b") as f:  # flip one byte inside layer 1 expert 2's first E-shard
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))
    threads = threading.active_count()
    with pytest.raises(ChecksumError, match=r"layer 1 expert 2"):  # the preload of an all-fitting budget
        load(bad, memory_budget=None, workers=2)
    assert threading.active_count() == threads, "a failed load left threads behind"
    model = load(bad, memory_budget=None, workers=2, preload=False)  # opening checks the manifest, not chunks
    try:
        ids = torch.full((1, 4), 5)
        with pytest.raises(ChecksumError, match=r"layer 1 expert 2"):
            for e in range(8):  # route until the corrupt expert is needed
                model(input_ids=torch.cat([ids, torch.arange(e * 16, e * 16 + 16)[None] % 150], dim=1))
                model(input_ids=_ids())
    finally:
        unload(model)


def test_load_unload_leaks_no_threads_or_fds(store):
    def fds():
        return len(os.listdir("/proc/self/fd"))

    threads, files = threading.active_count(), fds()
    for _ in range(3):
        model = load(store, memory_budget=None, workers=3)
        with torch.no_grad():
            model(input_ids=_ids())
        assert threading.active_count() >= threads + 4  # I/O thread + 3 workers are running
        unload(model)
        del model
    assert threading.active_count() == threads
    assert fds() == files


def test_decode_workers_keep_the_process_priority_unless_told_otherwise(store):
    for kwargs, expected in (({}, 0), ({"decode_nice": 3}, 3)):
        model = load(store, memory_budget=None, workers=2, **kwargs)
        try:
            assert model.zipmoe_engine.executor.decode_nice == expected
        finally:
            unload(model)


def test_a_model_dropped_without_unload_stops_its_engine_and_the_heap_unfreezes(store):
    """load() freezes the objects alive before it (engine/heap.py); the model itself must stay collectable,
    or a model dropped without unload() would keep its threads forever."""
    import gc

    gc.collect()
    threads = threading.active_count()
    first = load(store, memory_budget=None, workers=2)
    frozen = gc.get_freeze_count()
    assert frozen > 0
    second = load(store, memory_budget=None, workers=2)
    with torch.no_grad():
        first(input_ids=_ids())
    del first
    gc.collect()
    assert threading.active_count() == threads + 2 + 2, "the dropped model's engine is still running"
    assert gc.get_freeze_count() > 0, "another engine is loaded: the heap stays frozen"
    unload(second)
    assert gc.get_freeze_count() == 0, "the last engine to close unfreezes"
    assert threading.active_count() == threads


def test_reloading_into_the_same_variable_frees_the_old_model(store):
    """`model = load(...)` again keeps the old (unloaded) model alive during the new load, whose freeze
    catches it: it must still be freed once dropped (no reference cycle through a zipmoe model)."""
    import gc
    import weakref

    model = load(store, memory_budget=None, workers=1)
    unload(model)
    old = weakref.ref(model)
    model = load(store, memory_budget=None, workers=1)
    try:
        gc.collect()
        assert old() is None, "the old model is kept alive (frozen in a reference cycle)"
    finally:
        unload(model)


def test_a_load_failing_at_its_last_step_releases_everything_once(store, monkeypatch):
    import gc

    from zipmoe.engine import heap
    from zipmoe.models import load as load_module

    threads = threading.active_count()

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(load_module.log, "info", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        load(store, memory_budget=None, workers=1)
    monkeypatch.undo()
    gc.collect()  # finalizers of anything left behind run now, and must not release a second time
    assert heap._users == 0 and gc.get_freeze_count() == 0
    assert threading.active_count() == threads
    model = load(store, memory_budget=None, workers=1)  # and the next load works (no deadlock)
    unload(model)
    assert heap._users == 0 and gc.get_freeze_count() == 0


@pytest.mark.parametrize("plan_batch", [0, 2.5])
def test_plan_batch_must_be_a_positive_int(store, plan_batch):
    with pytest.raises(ZipMoEError, match="plan_batch"):
        load(store, planning=True, plan_batch=plan_batch)


def test_a_plan_for_a_batch_follows_the_calls_it_observes(store):
    """Only the prior is turned into union curves: the statistics already see each call's union, so a
    re-plan must plan for what calls needed (a second union would plan for nearly every expert)."""
    with StoreReader(store) as r:
        numel = next(iter(r.entries.values())).numel
        dense = sum(p.stat().st_size for p in r.dense_files())
        layers = sorted({k.layer for k in r.entries})
        experts = len({k.expert for k in r.entries})
    stats_path(store).unlink(missing_ok=True)
    model = load(store, memory_budget=dense + 8 * numel * 6 + 6 * numel, workers=2, planning=True, plan_batch=4)
    try:
        pools = model.zipmoe_engine.pools
        pools.replan_every, pools.drift_threshold = 10**9, 0.0
        rng = np.random.default_rng(0)
        per_call = 3  # the calls of this traffic need 3 distinct experts each
        for _ in range(3000):
            for layer in layers:
                pools.observe(layer, sorted(rng.choice(experts, per_call, replace=False).tolist()))
        pools.maybe_replan()
        pools._thread.shutdown(wait=True)
        assert pools.replans == 1
        planned_for = pools.plan.snapshot.curves.sum(axis=1)
        assert np.allclose(planned_for, per_call, rtol=0.05), planned_for
    finally:
        unload(model)


def test_plan_batch_without_planning_is_refused(store):
    with pytest.raises(ZipMoEError, match="planning=True"):
        load(store, plan_batch=16)


def test_budget_too_small_names_the_minimum(store):
    with pytest.raises(BudgetTooSmallError) as err:
        load(store, memory_budget="64KiB")
    assert err.value.minimum_bytes > 64 * 1024
    assert "too small" in str(err.value)


@pytest.mark.parametrize(("plan_batch", "late_merge"), [(1, False), (4, False), (1, True)])
def test_replanning_during_generation_keeps_logits_exact(store, tmp_path, plan_batch, late_merge):
    """Planned pools re-plan in the background while the model runs: outputs must not change (with a late
    merge too, which the planner then prices as the engine runs it)."""

    with StoreReader(store) as r:
        numel = next(iter(r.entries.values())).numel
        dense = sum(p.stat().st_size for p in r.dense_files())
    stats_path(store).unlink(missing_ok=True)  # start from the prior, not from an earlier test's statistics
    model = load(store, memory_budget=dense + 8 * numel * 6 + 6 * numel, workers=2, planning=True,
                 plan_batch=plan_batch, late_merge=late_merge)
    try:
        pools = model.zipmoe_engine.pools
        assert pools is not None, "a budget below everything-fits must plan its pools"
        assert pools.late_merge is late_merge
        called = pools.plan.snapshot.curves.sum(axis=1)  # experts a layer call needs, on average
        if plan_batch == 1:
            assert np.allclose(called, pools.top_k)
        else:  # planned for the union of 4 requests' experts
            assert np.all(called > 1.5 * pools.top_k) and np.all(called < plan_batch * pools.top_k)
        pools.replan_every, pools.drift_threshold = 1, 0.0
        ref = transformers.AutoModelForCausalLM.from_pretrained(store.parent / "hf")
        for seed in range(4):
            ids = torch.randint(3, 150, (2, 10), generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
        pools._thread.shutdown(wait=True)
        assert pools.replans > 0
    finally:
        unload(model)


def test_closing_a_layer_early_drains_its_run(store, monkeypatch):
    """An error in the caller's expert compute closes Engine.experts at a yield: every op of the run
    must be over before the lease hands the slots back (else a late merge overwrites a reused slot)."""
    import time

    from zipmoe.engine.engine import LayerOps

    finished: list[float] = []
    merge = LayerOps.merge

    def slow_merge(self, key):
        time.sleep(0.2)
        merge(self, key)
        finished.append(time.perf_counter())

    monkeypatch.setattr(LayerOps, "merge", slow_merge)
    model = load(store, memory_budget=None, workers=2)
    try:
        engine = model.zipmoe_engine
        gen = engine.experts(0, [0, 1, 2, 3, 4, 5])  # all cold: MISS loads, each with a merge step
        next(gen)
        gen.close()
        closed = time.perf_counter()
        time.sleep(1.0)  # let any op that was not drained run late
        assert all(t <= closed for t in finished), "an op of the closed layer ran after the close returned"
        ids = torch.randint(3, 150, (1, 8), generator=torch.Generator().manual_seed(9))
        ref = transformers.AutoModelForCausalLM.from_pretrained(store.parent / "hf")
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    finally:
        unload(model)


def test_failed_load_leaks_no_threads(store):
    from zipmoe.errors import ZipMoEError

    threads = threading.active_count()
    with pytest.raises(ZipMoEError, match="at least one I/O thread"):  # fails after the cache exists
        load(store, memory_budget=None, prefetch=True, io_threads=0)
    with pytest.raises(ZipMoEError):
        load(store, memory_budget=None, prefetch=True, workers=-1)
    assert threading.active_count() == threads


def _prefetcher_reading_slowly(reader, seconds: float, key):
    """A Prefetcher whose reads of `key`'s SM plane take `seconds`, already hinted to read `key`."""
    import time

    from zipmoe.engine.prefetch import Prefetcher

    read = reader.read_sm_into

    def slow(entry, buf, **kwargs):
        if entry.key == key:
            time.sleep(seconds)
        return read(entry, buf, **kwargs)

    reader.read_sm_into = slow
    pf = Prefetcher(reader, 2, 1 << 20, 1 << 20, pinned=False)
    pf.hint(key.layer, [key])
    pf.disk_free()
    return pf


def test_prefetch_never_serves_planes_of_an_older_fill(store):
    """Three hints without a collect in between reuse a slot set while a read into it is in flight:
    that read's planes must be dropped, never returned under its key."""
    import time


    with StoreReader(store) as reader:
        a, b, c = ExpertKey(1, 5), ExpertKey(2, 0), ExpertKey(0, 7)
        pf = _prefetcher_reading_slowly(reader, 0.3, a)
        try:
            time.sleep(0.1)  # a's read is in flight into set X
            pf.hint(2, [b])
            pf.hint(0, [c])  # refills set X
            pf.disk_free()
            got = pf.collect(1, [a])
            pf.collect(0, [c])
            assert a not in got, "served planes read into a slot set that was refilled since"
        finally:
            pf.close()


def test_a_layer_waits_for_a_prefetch_read_in_flight_only_if_it_needs_that_expert(store):
    """A wrong guess must not delay the layer (collect returns at once and never serves it later); a
    right one in flight is awaited and served."""
    import time


    with StoreReader(store) as reader:
        a, other = ExpertKey(1, 5), ExpertKey(1, 6)
        pf = _prefetcher_reading_slowly(reader, 0.4, a)
        try:
            time.sleep(0.1)  # a's read is in flight
            t0 = time.perf_counter()
            assert pf.collect(1, [other]) == {}
            assert time.perf_counter() - t0 < 0.2, "a layer waited for a read it does not need"
            time.sleep(0.5)  # the read has finished by now: its planes are dropped, not kept for later
            assert pf.collect(1, [a]) == {} and pf.counters.read == 0
            pf.hint(1, [a])
            pf.disk_free()
            time.sleep(0.1)
            t0 = time.perf_counter()
            got = pf.collect(1, [a])
            assert time.perf_counter() - t0 > 0.2 and set(got) == {a}  # awaited, and served
        finally:
            pf.close()


def test_two_prefetch_reads_run_at_once_and_a_layer_waits_only_for_the_one_it_needs(store):
    """Two read threads (so the disk does not idle while one waits for the GIL after its syscall): both
    hinted experts are in flight together; the layer awaits the one it needs and calls off the other."""
    import time

    from zipmoe.engine.prefetch import Prefetcher

    with StoreReader(store) as reader:
        a, b = ExpertKey(1, 5), ExpertKey(1, 6)
        read, started = reader.read_sm_into, []

        def slow(entry, buf, **kwargs):
            started.append(entry.key)
            time.sleep(0.4)
            return read(entry, buf, **kwargs)

        reader.read_sm_into = slow
        pf = Prefetcher(reader, 2, 1 << 20, 1 << 20, pinned=False)
        try:
            pf.hint(1, [a, b])
            pf.disk_free()
            deadline = time.perf_counter() + 0.3  # well inside the first read's 0.4 s
            while len(started) < 2 and time.perf_counter() < deadline:
                time.sleep(0.005)
            assert sorted(started) == [a, b], "the second hinted read did not start beside the first"
            t0 = time.perf_counter()
            got = pf.collect(1, [b])
            assert time.perf_counter() - t0 > 0.15 and set(got) == {b}  # b awaited and served
            assert pf.wait_idle(2.0)
            assert (pf.counters.read, pf.counters.discarded) == (1, 1)  # a called off, counted as wasted
        finally:
            pf.close()
    assert not any(t.name.startswith("zipmoe-prefetch") for t in threading.enumerate()), "close left threads"


def test_a_called_off_read_still_writing_its_slot_keeps_a_later_read_out_of_it(store):
    """Hints reuse slots. A read called off while it still writes slot X must not share X with the read a
    later hint put there: its late bytes would land over planes that were already checked (found in review
    of the two-thread prefetcher). The later read waits for the old one to stop, and is served intact."""
    import time

    import numpy as np

    from zipmoe.engine.prefetch import Prefetcher

    with StoreReader(store) as reader:
        a, c, d = ExpertKey(1, 5), ExpertKey(0, 1), ExpertKey(1, 2)
        read, writing, overlaps = reader.read_sm_into, {}, []

        def tracked(entry, buf, **kwargs):
            addr = buf.ctypes.data
            if addr in writing:
                overlaps.append((writing[addr], entry.key))
            writing[addr] = entry.key
            if entry.key == a:
                time.sleep(0.5)  # a holds its slot, stalled before its first part (a GIL wait, a slow disk)
            try:
                return read(entry, buf, **kwargs)
            finally:
                writing.pop(addr, None)

        reader.read_sm_into = tracked
        pf = Prefetcher(reader, 1, 1 << 20, 1 << 20, pinned=False)  # one slot per set: hints 1 and 3 share it
        try:
            pf.hint(1, [a])
            pf.disk_free()
            time.sleep(0.05)  # a is in flight
            pf.layer_started()
            assert pf.collect(1, []) == {}  # layer 1 went on without a: called off
            pf.hint(0, [c])
            pf.layer_started()
            pf.collect(0, [])
            pf.disk_free()
            pf.hint(1, [d])  # the set a is still writing
            pf.layer_started()
            pf.disk_free()
            assert pf.wait_idle(5.0)
            got = pf.collect(1, [d])
            assert overlaps == [], f"two reads wrote one slot at once: {overlaps}"
            want = read(reader.entries[d], reader.new_sm_buffer())
            assert set(got) == {d} and np.array_equal(got[d][0], want)
        finally:
            pf.close()


def test_unbounded_budget_with_prefetch_still_keeps_every_expert_decoded(store):
    model = load(store, memory_budget=None, prefetch=True, workers=2)
    try:
        with StoreReader(store) as r:
            n = len(r.entries)
        assert model.zipmoe_engine.cache.capacity[State.F] == n
    finally:
        unload(model)


def test_closing_the_engine_of_a_resident_model_takes_its_weights_back(store):
    """Everything fits: the experts modules run on views of the F pool. Closing the engine (not only
    unload) must drop those views, so the model cannot run on freed memory."""
    from zipmoe.models.compute import experts_modules

    model = load(store, memory_budget=None, workers=1)
    engine = model.zipmoe_engine
    assert engine.resident
    with torch.no_grad():
        model(input_ids=_ids())
    engine.close()
    for _, _, module in experts_modules(model):
        assert module._zipmoe_resident is None
        assert module.gate_up_proj.device.type == "meta" and module.down_proj.device.type == "meta"


def test_the_engine_tells_the_eviction_policy_how_many_tokens_each_expert_got(store):
    """compute → Engine.experts → cache.acquire → policy.accessed: each layer call's token counts add up
    to tokens × top-k (the weights LRFU uses to learn a prompt's favourite experts from its prefill)."""
    from zipmoe.cache.policy import LRFU

    seen: list[dict] = []

    class Spy(LRFU):
        def accessed(self, tokens):
            seen.append(dict(tokens))
            super().accessed(tokens)

    with StoreReader(store) as r:
        numel = next(iter(r.entries.values())).numel
        dense = sum(p.stat().st_size for p in r.dense_files())
        top_k = r.config["num_experts_per_tok"]
    model = load(store, memory_budget=dense + 8 * numel * 6 + 6 * numel, workers=2, eviction=Spy)
    try:
        assert not model.zipmoe_engine.resident
        ids = _ids()
        with torch.no_grad():
            model(input_ids=ids)
        calls = [c for c in seen if c]
        assert calls and all(sum(c.values()) == ids.numel() * top_k for c in calls)
    finally:
        unload(model)


def test_striped_plane_reads_keep_logits_exact(store, monkeypatch):
    """Every plane read split into parts (min_part patched down to one page so the tiny planes split too)."""
    monkeypatch.setattr(reader_mod, "StripedReads", functools.partial(StripedReads, min_part=ALIGN))
    with StoreReader(store) as r:
        numel = next(iter(r.entries.values())).numel
        dense = sum(p.stat().st_size for p in r.dense_files())
    ref = transformers.AutoModelForCausalLM.from_pretrained(store.parent / "hf")
    model = load(store, memory_budget=dense + 8 * numel * 6 + 6 * numel, workers=2, read_stripes=3)
    try:
        for seed in range(3):
            ids = torch.randint(3, 150, (2, 10), generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
        assert model.zipmoe_engine.stats.snapshot()["bytes_read"] > 0
        assert any(t.name.startswith("zipmoe-stripe") for t in threading.enumerate())
    finally:
        unload(model)
    assert not any(t.name.startswith("zipmoe-stripe") for t in threading.enumerate()), "unload left stripe threads"


def test_a_prefetch_read_its_layer_does_not_need_stops_at_the_next_part(store, monkeypatch):
    """A wrong guess in flight when its layer starts must not keep sharing the disk with the layer's reads:
    it stops at its next part boundary, and its bytes are counted as read and wasted, not hidden."""
    import time

    from zipmoe.engine.prefetch import Prefetcher

    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, at: time.sleep(0.2) or real(fd, bufs, at))  # 0.2 s a part
    with StoreReader(store) as reader:
        a, other = ExpertKey(1, 5), ExpertKey(1, 6)
        entry = reader.entries[a]
        assert entry.sm.length > ALIGN, "the SM plane must take more than one part"
        pf = Prefetcher(reader, 2, 1 << 20, 1 << 20, pinned=False, part=ALIGN)
        try:
            pf.hint(a.layer, [a])
            pf.disk_free()
            time.sleep(0.1)  # its first part is in flight
            assert pf.collect(1, [other]) == {}
            time.sleep(0.4)  # the part ends, the thread sees the layer went on without it
            c = pf.counters
            assert (c.read, c.discarded) == (0, 1)
            assert c.bytes_read == c.wasted_bytes == ALIGN, "stopped after its first part, every byte counted"
        finally:
            pf.close()


def test_read_direct_into_in_parts_reads_the_same_bytes_and_stops_between_parts(store):
    from zipmoe.store.aligned import ReadStopped, aligned_buffer, read_direct_into

    data = (store / "experts.bin").read_bytes()
    fd = os.open(store / "experts.bin", os.O_RDONLY)
    try:
        offset, length = 1000, min(len(data) - 1000, 5 * ALIGN + 17)
        whole = read_direct_into(fd, offset, length, aligned_buffer(8 * ALIGN)).tobytes()
        parts = read_direct_into(fd, offset, length, aligned_buffer(8 * ALIGN), part=ALIGN).tobytes()
        assert whole == parts == data[offset : offset + length]
        asked = []
        with pytest.raises(ReadStopped) as stopped:
            read_direct_into(fd, offset, length, aligned_buffer(8 * ALIGN), part=2 * ALIGN,
                             stop=lambda: asked.append(1) or len(asked) == 2)
        assert stopped.value.bytes_read == 4 * ALIGN and len(asked) == 2  # not asked before the first part
        with pytest.raises(ValueError, match="multiples of 4096"):
            read_direct_into(fd, offset, length, aligned_buffer(8 * ALIGN), part=1000)
    finally:
        os.close(fd)
