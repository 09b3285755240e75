"""late_merge=True (workers decode exponents only, the compute side merges both planes when they are in):
the same logits and tokens as plain transformers for every model type, in every cache state, with and
without prefetch; the merge itself against the codec's oracle; the plan lets shards run before the SM read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from tests.engine.engine_helpers import assert_cache_holds_the_stored_planes, settle_prefetch
from tests.tiny_models import TINY_CONFIGS, build_tiny_checkpoint

from zipmoe.codec import merge_into, split_bf16
from zipmoe.convert import convert
from zipmoe.engine import late_merge
from zipmoe.engine.late_merge import TorchMerge, TritonMerge, merge_class
from zipmoe.errors import ZipMoEError
from zipmoe.models.load import load, unload
from zipmoe.scheduler import CostModel
from zipmoe.scheduler.model import Kind, build_jobs
from zipmoe.store.reader import StoreReader
from zipmoe.types import ExpertKey, State


def _special_bits(size: int) -> np.ndarray:
    bits = np.random.default_rng(0).integers(0, 1 << 16, size=size, dtype=np.uint16)
    bits[:8] = [0, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0x0001, 0x8001, 0xFFFF]  # ±0, ±inf, NaN, denormals, all ones
    return bits


def test_torch_merge_matches_the_codec_merge_bit_for_bit():
    bits = _special_bits(50_001)
    sm, exp = split_bf16(bits)
    want = np.empty_like(bits)
    merge_into(sm, exp, want)
    out = torch.empty(bits.size, dtype=torch.bfloat16)
    merge = TorchMerge(bits.size, torch.device("cpu"))
    merge(torch.from_numpy(sm), torch.from_numpy(exp), out)
    assert np.array_equal(out.view(torch.int16).numpy().view(np.uint16), want)
    assert np.array_equal(want, bits)
    merge(torch.from_numpy(sm), torch.from_numpy(exp), out)  # the scratch is reused: same bits again
    assert np.array_equal(out.view(torch.int16).numpy().view(np.uint16), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_the_triton_merge_is_chosen_on_cuda_and_matches_the_codec_bit_for_bit(monkeypatch):
    """The CUDA default: if Triton is missing or broken here, this fails instead of quietly timing TorchMerge."""
    monkeypatch.setattr(late_merge, "MERGE_KERNEL", "auto")
    monkeypatch.setattr(late_merge, "_VERDICTS", {})
    cuda = torch.device("cuda")
    assert merge_class(cuda) is TritonMerge
    late_merge.check_triton_merge(cuda)  # every pattern, ragged tail
    bits = _special_bits(3 * 4096 + 17)  # several blocks and a ragged tail
    sm, exp = split_bf16(bits)
    merge = TritonMerge(bits.size + 100, cuda)  # scratch longer than the expert
    out = torch.full((bits.size,), -1, dtype=torch.int16, device="cuda").view(torch.bfloat16)
    for host in (torch.from_numpy(sm).pin_memory(), torch.from_numpy(sm)):
        merge(host, torch.from_numpy(exp).pin_memory(), out)
        assert np.array_equal(out.view(torch.int16).cpu().numpy().view(np.uint16), bits)
        out.view(torch.int16).fill_(-1)


def test_the_merge_kernel_setting_falls_back_to_torch_byte_ops_and_rejects_a_typo(monkeypatch, caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda:0")
    monkeypatch.setattr(late_merge, "MERGE_KERNEL", "auto")
    assert merge_class(cpu) is TorchMerge  # a CPU never uses Triton
    monkeypatch.setattr(late_merge, "MERGE_KERNEL", "torch")
    assert merge_class(cuda) is TorchMerge
    monkeypatch.setattr(late_merge, "MERGE_KERNEL", "auto")
    for failure, warned in ((ImportError("No module named 'triton'"), False),
                            (ZipMoEError("the Triton merge kernel wrote 0x0000 for BF16 pattern 0x8000"), True),
                            (RuntimeError("PTXAS error: Internal Triton PTX codegen error"), True)):
        def check(device, failure=failure):
            raise failure

        monkeypatch.setattr(late_merge, "check_triton_merge", check)
        monkeypatch.setattr(late_merge, "_VERDICTS", {})
        caplog.clear()
        with caplog.at_level("INFO", logger="zipmoe"):
            assert merge_class(cuda) is TorchMerge  # slower, never wrong, never a failed load
        assert ("failed its check" in caplog.text) is warned and str(failure) in caplog.text
    monkeypatch.setattr(late_merge, "check_triton_merge", lambda device: None)
    monkeypatch.setattr(late_merge, "_VERDICTS", {})
    assert merge_class(cuda) is TritonMerge  # a passed check picks the kernel, once per device
    monkeypatch.setattr(late_merge, "check_triton_merge", lambda device: pytest.fail("checked twice"))
    assert merge_class(cuda) is TritonMerge
    monkeypatch.setattr(late_merge, "MERGE_KERNEL", "trition")
    with pytest.raises(ZipMoEError, match="ZIPMOE_MERGE_KERNEL='trition'"):
        merge_class(cpu)


def test_a_late_merged_miss_decodes_without_waiting_for_its_sm_read():
    costs = CostModel(disk_bytes_per_s=1e9, disk_latency_s=0.0, decode_bytes_per_s=1e9, merge_bytes_per_s=1e9,
                      compute_s=1e-4)
    key = ExpertKey(0, 0)
    fused = costs.task(key, State.MISS, 1000, 300, 1000, 4, fused=True)
    late = costs.task(key, State.MISS, 1000, 300, 1000, 4, late_merge=True)
    assert late.merge_s == 0 and late.late_merge and not late.shards_need_sm and fused.shards_need_sm
    for task, shard_waits_for_sm in ((fused, True), (late, False)):
        jobs = build_jobs([task])
        sm = next(j.id for j in jobs if j.kind == Kind.READ_SM)
        shards = [j for j in jobs if j.kind == Kind.SHARD]
        compute = next(j for j in jobs if j.kind == Kind.COMPUTE)
        assert all((sm in j.preds) is shard_waits_for_sm for j in shards)
        assert not any(j.kind == Kind.MERGE for j in jobs)
        assert {j.id for j in shards} <= set(compute.preds)
        assert sm in compute.preds  # late: the compute waits for the SM read itself, not through the shards


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"late-merge-{request.param}")
    ckpt = build_tiny_checkpoint(request.param, root / "hf", seed=13)
    return ckpt, convert(ckpt, root / "store", progress=False, workers=2)


# (pools, staging slots, states that must be met): C/S/MISS hits; E hits (SM read, held shards) with one
# staging slot, so every layer runs in several waves that reuse it
LAYOUTS = {"c-s-miss": (lambda n: {State.F: 1, State.C: n // 6, State.S: 2, State.E: 2}, None, ("MISS", "C", "S")),
           "e-one-slot": (lambda n: {State.F: 1, State.C: n // 6, State.S: 0, State.E: n // 3}, 1, ("MISS", "E"))}


_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=_GPU)])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("prefetch", [False, True])
def test_late_merge_gives_the_reference_logits_in_every_state(converted, prefetch, layout, device, caplog):
    """On CUDA this is where the asynchronous copies meet reused host planes: staging slots reused by later
    waves, cache slots refilled by later layers, prefetch slot sets refilled every other layer."""
    ckpt, store = converted
    with StoreReader(store) as r:
        n = len(r.entries)
    pools, slots, met = LAYOUTS[layout]
    capacities = pools(n)
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt).to(device)
    ids = torch.randint(3, 150, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the second row
    ids, mask = ids.to(device), mask.to(device)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    want = ref.generate(input_ids=ids, attention_mask=mask, **gen)
    with caplog.at_level("WARNING", logger="zipmoe"):
        model = load(store, device=device, capacities=capacities, workers=2, late_merge=True, prefetch=prefetch,
                     preload=False, staging_slots=slots)
    assert ("late_merge=True on a CPU" in caplog.text) == (device == "cpu")  # slower there: the user is told
    try:
        engine = model.zipmoe_engine
        assert engine.late_merge and engine.staging.exp is not None
        assert engine.merge_path == ("triton" if device == "cuda" else "torch")
        if prefetch:
            settle_prefetch(engine)  # the states met below must not depend on thread timing
        for _ in range(2):  # cold, then with what the cache kept
            out = model.generate(input_ids=ids, attention_mask=mask, **gen)
            assert torch.equal(out.sequences, want.sequences)
            for step, (a, b) in enumerate(zip(out.logits, want.logits, strict=True)):
                assert torch.equal(a, b), f"logits of step {step} differ"
        hits = engine.stats.snapshot()["hits"]
        assert all(hits[s] > 0 for s in met), hits
        assert engine.cache.budget.used() <= engine.cache.budget.total
        assert_cache_holds_the_stored_planes(engine)
    finally:
        unload(model)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=_GPU)])
def test_late_merge_is_the_default_on_cuda_only(converted, device, caplog):
    """On CUDA the GPU merges (18 % off batch-1 TPOT on the device); on a CPU the workers' fused decode stays,
    with no warning, and an explicit late_merge=False is honoured on CUDA."""
    _, store = converted
    with caplog.at_level("WARNING", logger="zipmoe"):
        model = load(store, device=device, workers=2, preload=False)
        try:
            assert model.zipmoe_engine.late_merge is (device == "cuda")
            assert model.zipmoe_engine.merge_path == ("triton" if device == "cuda" else "workers")
            assert (model.zipmoe_engine.staging.exp is not None) is (device == "cuda")
        finally:
            unload(model)
    assert "late_merge" not in caplog.text
    model = load(store, device=device, workers=2, preload=False, late_merge=False)
    try:
        assert model.zipmoe_engine.late_merge is False and model.zipmoe_engine.staging.exp is None
        assert model.zipmoe_engine.merge_path == "workers"
    finally:
        unload(model)
