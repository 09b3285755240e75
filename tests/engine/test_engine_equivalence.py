"""The engine end to end: convert a tiny checkpoint, zipmoe.load it under budgets from "everything
fits" down to the minimum, and require logits and greedy tokens torch.equal to plain transformers,
batch 1 and 4 (left padding), cold and warm caches, every supported model_type."""

from __future__ import annotations

import pytest
import torch
import transformers
from tests.engine.engine_helpers import budgets, padded_inputs
from tests.tiny_models import TINY_CONFIGS, build_tiny_checkpoint

from zipmoe.convert import convert
from zipmoe.models.load import load, unload

MODEL_TYPES = sorted(TINY_CONFIGS)
_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]
DEVICES = ["cpu", pytest.param("cuda", marks=_GPU)]


@pytest.fixture(scope="module", params=MODEL_TYPES)
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    ckpt = build_tiny_checkpoint(request.param, root / "hf", seed=3)
    store = convert(ckpt, root / "store", progress=False, workers=2)
    return ckpt, store


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("reference", "late_merge"), [("grouped_mm", False), ("eager", False), ("grouped_mm", True)])
def test_logits_and_tokens_equal_transformers(converted, reference, late_merge, device):
    """late_merge: the workers decode exponents only and the compute device merges (engine/late_merge.py)."""
    ckpt, store = converted
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt, experts_implementation=reference).to(device)
    for name, budget in budgets(store).items():
        # "all" preloads every expert at load (the default when they all fit); the others start cold
        model = load(store, device=device, memory_budget=budget, experts_implementation=reference, workers=2,
                     preload=None if name == "all" else False, late_merge=late_merge)
        try:
            for batch in (1, 4):
                ids, mask = (t.to(device) for t in padded_inputs(batch))
                with torch.no_grad():
                    want = ref(input_ids=ids, attention_mask=mask).logits
                    cold = model(input_ids=ids, attention_mask=mask).logits
                    warm = model(input_ids=ids, attention_mask=mask).logits
                assert torch.equal(cold, want), f"{name} budget, batch {batch}: cold logits differ"
                assert torch.equal(warm, want), f"{name} budget, batch {batch}: warm logits differ"
                # generate() decodes grouped_mm with batched_mm on a GPU: the engine must follow it
                gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
                           return_dict_in_generate=True)
                out = model.generate(input_ids=ids, attention_mask=mask, **gen)
                ref_out = ref.generate(input_ids=ids, attention_mask=mask, **gen)
                assert torch.equal(out.sequences, ref_out.sequences)
                assert all(torch.equal(a, b) for a, b in zip(out.logits, ref_out.logits, strict=True)), (
                    f"{name} budget, batch {batch}: generate()'s step logits differ")
            stats = model.zipmoe_engine.stats.snapshot()
            # "all": every expert preloaded into F and run by the model's own kernels on the pool's memory
            assert model.zipmoe_engine.resident == (name == "all")
            assert (stats["experts_served"] > 0) == (name != "all")
            budget_obj = model.zipmoe_engine.cache.budget
            assert budget_obj.peak() <= budget_obj.total
            if name == "all":
                assert stats["bytes_read"] == 0, "not preloaded"
            if name == "minimum":
                assert stats["hits"]["MISS"] + stats["hits"]["S"] + stats["hits"]["E"] > 0, "budget forced no loads"
        finally:
            unload(model)
