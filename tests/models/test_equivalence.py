"""Bit-exactness of the zipmoe experts path against plain transformers, one row per model_type.

Reference: from_pretrained with experts_implementation "eager", "batched_mm" and the default
(grouped_mm; generate() decodes it with batched_mm on a GPU). Candidate: build_model_without_experts
(dense weights only) + install(InMemoryExpertSource), whose source yields copies of the experts in a
shuffled order.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from tests.tiny_models import TINY_CONFIGS, TINY_SEQ2SEQ_CONFIGS, build_tiny_checkpoint, read_checkpoint
from transformers.integrations.moe import _grouped_linear

from zipmoe.models import ADAPTERS, compute, expert_tensor_plan
from zipmoe.models.build import build_model_without_experts, load_hf_config
from zipmoe.models.compute import _one_group_linear, install
from zipmoe.models.sources import InMemoryExpertSource

MODEL_TYPES = sorted(TINY_CONFIGS)
REFERENCES = ["eager", "batched_mm", None]  # None: whatever from_pretrained picks by default (grouped_mm)
_NO_CUDA = not torch.cuda.is_available()
_GPU = [pytest.mark.gpu, pytest.mark.skipif(_NO_CUDA, reason="no CUDA")]
DEVICES = ["cpu", pytest.param("cuda", marks=_GPU)]


def test_every_adapter_has_a_row():
    rows = set(TINY_CONFIGS) | set(TINY_SEQ2SEQ_CONFIGS)  # encoder-decoder ones: tests/models/test_per_expert.py
    assert set(ADAPTERS) <= rows, "add a tiny config row for every registered adapter"


@pytest.fixture(scope="module", params=MODEL_TYPES)
def checkpoint(request, tmp_path_factory):
    return build_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param), seed=1)


def _dense_state_dict(path):
    tensors, _ = read_checkpoint(path)
    plan = expert_tensor_plan(list(tensors), load_hf_config(path).to_dict())
    return {k: tensors[k] for k in plan.dense}


def _inputs(batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 150, (batch, 9), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(1, batch):  # left padding of different lengths
        mask[row, : 2 * row] = 0
        ids[row, : 2 * row] = 0
    return ids, mask


def _pair(path, reference, device="cpu"):
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, experts_implementation=reference)
    ref = ref.to(device).eval()
    dense = _dense_state_dict(path)
    model = build_model_without_experts(path, dense, device=device, experts_implementation=reference)
    source = InMemoryExpertSource.from_model(ref, seed=3)
    install(model, source)
    return ref, model, source


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reference", REFERENCES, ids=["eager", "batched_mm", "default"])
def test_logits_and_greedy_tokens_equal(checkpoint, reference, device):
    ref, model, source = _pair(checkpoint, reference, device)
    assert model.config._experts_implementation == "zipmoe"
    experts = [p for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "experts.down_proj"))]
    assert experts and all(p.is_meta for p in experts)
    with torch.no_grad():
        for batch in (1, 4):
            ids, mask = (t.to(device) for t in _inputs(batch))
            want = ref(input_ids=ids, attention_mask=mask).logits
            got = model(input_ids=ids, attention_mask=mask).logits
            assert torch.equal(got, want), f"batch {batch}: max diff {(got - want).abs().max()}"
        ids, mask = (t.to(device) for t in _inputs(4, seed=1))
        kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True)
        got, want = model.generate(ids, **kw), ref.generate(ids, **kw)  # on a GPU, decode steps switch kernels
        assert torch.equal(got.sequences, want.sequences)
        assert all(torch.equal(g, w) for g, w in zip(got.logits, want.logits, strict=True))
    assert source.calls and all(list(needed) == sorted(set(needed)) for _, needed in source.calls)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("min_slots", [1, 1 << 30], ids=["index-copy-every-expert", "copy-per-slot"])
def test_batched_mm_stacks_the_same_bits_however_the_experts_are_copied(checkpoint, min_slots, device, monkeypatch):
    """The default copies an expert routed to several slots with one index_copy_; both limits give the same bits."""
    monkeypatch.setattr(compute, "INDEX_COPY_MIN_SLOTS", min_slots)
    ref, model, _ = _pair(checkpoint, "batched_mm", device)
    with torch.no_grad():
        ids, mask = (t.to(device) for t in _inputs(4))
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           ref(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("device", DEVICES)
def test_one_group_grouped_mm_equals_the_full_call(device):
    """The grouped_mm mode's premise: each group of grouped_mm is computed alone, so calling it with
    one expert's weights gives the same rows as the reference's call over all experts."""
    gen = torch.Generator().manual_seed(0)
    big = device == "cuda"
    n_exp, hidden, out = (60, 2048, 2816) if big else (12, 128, 96)
    weight = (torch.randn(n_exp, out, hidden, generator=gen) * 0.02).bfloat16().to(device)
    counts = torch.randint(0, 9 if big else 5, (n_exp,), generator=gen)
    x = torch.randn(int(counts.sum()), hidden, generator=gen).bfloat16().to(device)
    offs = torch.cumsum(counts, 0).to(torch.int32).to(device)
    full = _grouped_linear(x, weight, offs)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            assert torch.equal(_one_group_linear(x[start:end], weight[e].clone()), full[start:end]), e
        start = end


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["eager", "grouped_mm"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=_GPU)])
def test_qwen1_5_moe_shaped_layers_equal(reference, device):
    """Real expert shapes (60 experts of 2048x1408, top-4, shared expert) so the kernels pick the
    tile configurations a real model gets; 2 layers and a small vocabulary keep it cheap."""
    config = transformers.Qwen2MoeConfig(
        vocab_size=512, hidden_size=2048, num_hidden_layers=2, num_attention_heads=16,
        num_key_value_heads=16, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
        num_experts=60, num_experts_per_tok=4,
    )
    torch.manual_seed(0)
    with torch.device(device):
        ref = transformers.AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16, experts_implementation=reference
        ).eval()
    expert_names = {n for n, _ in ref.named_parameters() if ".experts." in n}
    dense = {k: v for k, v in ref.state_dict().items() if k not in expert_names}
    model = build_model_without_experts(config, dense, device=device, experts_implementation=reference)
    install(model, InMemoryExpertSource.from_model(ref, seed=5))
    ids, mask = (t.to(device) for t in _inputs(4, seed=2))
    ids = ids % 512
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           ref(input_ids=ids, attention_mask=mask).logits)
