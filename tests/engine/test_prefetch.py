"""Cross-layer prefetch never changes outputs: logits and greedy tokens torch.equal with prefetch on
and off (and to plain transformers), for every model type, at a budget that forces reads."""

from __future__ import annotations

import itertools

import pytest
import torch
import transformers
from tests.engine.engine_helpers import assert_cache_holds_the_stored_planes, prefetch_budget, settle_prefetch
from tests.tiny_models import TINY_CONFIGS, build_tiny_checkpoint

from zipmoe.convert import convert
from zipmoe.models.load import load, unload
from zipmoe.store.reader import StoreReader


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"prefetch-{request.param}")
    ckpt = build_tiny_checkpoint(request.param, root / "hf", seed=11)
    return ckpt, convert(ckpt, root / "store", progress=False, workers=2)


def test_prefetch_on_off_identical(converted):
    ckpt, store = converted
    budget = prefetch_budget(store)  # forces misses; room for read-ahead
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    ids = torch.randint(3, 150, (1, 6), generator=torch.Generator().manual_seed(2))
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    want = ref.generate(input_ids=ids, **gen)
    for prefetch in (False, True):
        model = load(store, memory_budget=budget, workers=2, prefetch=prefetch, preload=False)  # cold: misses
        try:
            if prefetch:
                settle_prefetch(model.zipmoe_engine)
            out = model.generate(input_ids=ids, **gen)
            assert torch.equal(out.sequences, want.sequences), f"prefetch={prefetch}: tokens differ"
            for step, (a, b) in enumerate(zip(out.logits, want.logits, strict=True)):
                assert torch.equal(a, b), f"prefetch={prefetch}: logits of step {step} differ"
            engine = model.zipmoe_engine
            if prefetch:
                counters = engine.prefetcher.counters.snapshot()
                assert counters["hinted"] > 0 and counters["read"] > 0, counters
                assert counters["used"] > 0, f"no prefetched expert was decoded (path untested): {counters}"
                assert engine.stats.snapshot()["prefetch_bytes_read"] > 0
                assert_cache_holds_the_stored_planes(engine)
            else:
                assert engine.prefetcher is None and engine.hint is None
        finally:
            unload(model)


def test_the_trace_counts_every_byte_the_layers_read(converted):
    """Engine.trace's per-layer read_bytes (benchmarks divide them by read time) add up to the bytes read."""
    _ckpt, store = converted
    with StoreReader(store) as r:
        numel = next(iter(r.entries.values())).numel
        dense = sum(p.stat().st_size for p in r.dense_files())
    model = load(store, memory_budget=dense + 8 * numel * 8, workers=2, preload=False)
    try:
        engine = model.zipmoe_engine
        engine.trace = []
        before = engine.stats.snapshot()["bytes_read"]
        ids = torch.randint(3, 150, (1, 6), generator=torch.Generator().manual_seed(3))
        model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        read = engine.stats.snapshot()["bytes_read"] - before
        assert read > 0 and sum(t.read_bytes for t in engine.trace) == read
        # every layer call's routing sync was timed and handed to the engine (then reset for the next)
        assert engine.trace and all(t.sync_wait_s is not None and t.sync_wait_s > 0 for t in engine.trace)
        assert engine.sync_wait_s == 0.0
        # and each call knows when its experts forward began and the previous one returned, in order
        for prev, cur in itertools.pairwise(engine.trace):
            assert prev.left <= cur.previous_forward_left <= cur.forward_entered <= cur.entered
        engine.trace = None
        marks = engine.forward_entered_at, engine.forward_left_at
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert engine.sync_wait_s == 0.0, "untraced runs must not time their syncs"
        assert (engine.forward_entered_at, engine.forward_left_at) == marks, "nor mark their forwards"
    finally:
        unload(model)
