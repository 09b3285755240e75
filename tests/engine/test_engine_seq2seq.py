"""The engine end to end for an encoder-decoder model with per-expert nn.Linear experts
(SwitchTransformers): convert, zipmoe.load under budgets from "everything fits" to the minimum, and
require logits and generate()'s tokens and step logits torch.equal to plain transformers, batch 1 and 4
(padded), cold and warm caches."""

from __future__ import annotations

import pytest
import torch
import transformers
from tests.engine.engine_helpers import budgets, padded_inputs
from tests.tiny_models import TINY_SEQ2SEQ_CONFIGS, build_tiny_checkpoint

from zipmoe.convert import convert
from zipmoe.errors import UnsupportedModelError, ZipMoEError
from zipmoe.generation import load_handle
from zipmoe.models.load import load, unload

_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]
DEVICES = ["cpu", pytest.param("cuda", marks=_GPU)]


@pytest.fixture(scope="module", params=sorted(TINY_SEQ2SEQ_CONFIGS))
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    ckpt = build_tiny_checkpoint(request.param, root / "hf", seed=3)
    return ckpt, convert(ckpt, root / "store", progress=False, workers=2)


def _inputs(batch: int):
    """Padded encoder inputs and 4 decoder tokens."""
    ids, mask = padded_inputs(batch, length=8)
    return ids, mask, torch.randint(3, 150, (batch, 4), generator=torch.Generator().manual_seed(batch))


@pytest.mark.parametrize("device", DEVICES)
def test_logits_and_tokens_equal_transformers(converted, device):
    ckpt, store = converted
    ref = transformers.AutoModelForSeq2SeqLM.from_pretrained(ckpt).to(device).eval()
    dispatched = []  # the router's masks: these inputs must make it drop tokens over the expert capacity
    hook = ref.encoder.block[1].layer[1].mlp.experts.register_forward_pre_hook(lambda m, a: dispatched.append(a[1]))
    for name, budget in budgets(store).items():
        model = load(store, device=device, memory_budget=budget, workers=2, preload=None if name == "all" else False)
        try:
            assert isinstance(model, type(ref))
            for batch in (1, 4):
                ids, mask, dec = (t.to(device) for t in _inputs(batch))
                kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
                with torch.no_grad():
                    want, cold, warm = ref(**kw).logits, model(**kw).logits, model(**kw).logits
                assert torch.equal(cold, want), f"{name} budget, batch {batch}: cold logits differ"
                assert torch.equal(warm, want), f"{name} budget, batch {batch}: warm logits differ"
                gen = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
                out = model.generate(input_ids=ids, attention_mask=mask, **gen)
                ref_out = ref.generate(input_ids=ids, attention_mask=mask, **gen)
                assert torch.equal(out.sequences, ref_out.sequences)
                assert all(torch.equal(a, b) for a, b in zip(out.logits, ref_out.logits, strict=True))
            stats = model.zipmoe_engine.stats.snapshot()
            assert stats["steps"] > 0
            assert model.zipmoe_engine.resident == (name == "all")
            assert (stats["experts_served"] > 0) == (name != "all")
            budget_obj = model.zipmoe_engine.cache.budget
            assert budget_obj.peak() <= budget_obj.total
            if name == "minimum":
                assert stats["hits"]["MISS"] + stats["hits"]["S"] + stats["hits"]["E"] > 0, "budget forced no loads"
        finally:
            unload(model)
        if name == "all":  # unload gave the pool's memory back: the expert modules hold meta placeholders
            assert all(p.is_meta for n, p in model.named_parameters() if ".experts.expert_" in n)
    hook.remove()
    routed = torch.cat([m.sum(dim=-1).flatten() for m in dispatched])
    assert (routed == 0).any() and (routed == 1).any()


def test_an_experts_implementation_it_does_not_have_is_refused(converted):
    _, store = converted
    with pytest.raises(UnsupportedModelError, match="own loop"):
        load(store, experts_implementation="grouped_mm", workers=1)


def test_prefetch_is_refused_rather_than_reserving_memory_for_nothing(converted):
    _, store = converted
    with pytest.raises(UnsupportedModelError, match="prefetch"):
        load(store, prefetch=True, workers=1)


def test_the_token_loop_says_to_use_generate(converted):
    """zipmoe generate / chat / serve drive decoder-only models; an encoder-decoder store says what to do."""
    _, store = converted
    with pytest.raises(ZipMoEError, match=r"encoder-decoder.*model\.generate"):
        load_handle(store)
