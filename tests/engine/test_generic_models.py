"""The generic rule on HF MoE families that have no adapter of their own: convert a tiny random checkpoint
and require logits and greedy tokens torch.equal to plain transformers, everything fits / half / minimum,
batch 1 and 4 (left padding); and the checkpoints conversion must refuse or trim, as from_pretrained
does. The sweep over 43 model types (39 served) is scripts/generic_sweep.py (BENCHMARKS.md)."""

from __future__ import annotations

import pytest
import torch
import transformers
from tests.engine.engine_helpers import budgets, padded_inputs
from tests.tiny_models import _randomize_

from zipmoe.convert import convert
from zipmoe.errors import ConversionError
from zipmoe.models.load import load, unload
from zipmoe.models.registry import ADAPTERS

_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]
_BASE = dict(vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_MLA = dict(num_key_value_heads=4, head_dim=8, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8,
            qk_rope_head_dim=8, v_head_dim=16)
FAMILIES = {  # what each row covers
    # MLA attention, a shared expert, grouped top-k routing
    "deepseek_v3": dict(_MLA, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                        num_experts_per_tok=3, first_k_dense_replace=0, n_shared_experts=1, topk_group=1, n_group=1),
    # checkpoint names its fused experts block_sparse_moe.input_linear / output_linear; a shared MLP beside them
    "granitemoeshared": dict(intermediate_size=96, num_local_experts=8, num_experts_per_tok=3,
                             shared_intermediate_size=32),
    # linear-attention layers between the full ones, a gated shared expert
    "qwen3_next": dict(head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                       num_experts_per_tok=3, decoder_sparse_step=1, mlp_only_layers=[],
                       shared_expert_intermediate_size=32, layer_types=["linear_attention", "full_attention"],
                       linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                       linear_value_head_dim=16),
    # its checkpoint keeps model.norm.weight, which one of transformers' renamings would move
    "deepseek_v4": dict(head_dim=16, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3,
                        n_shared_experts=1, q_lora_rank=24, qk_rope_head_dim=8, mlp_layer_types=["moe", "moe"],
                        layer_types=["heavily_compressed_attention", "heavily_compressed_attention"]),
    # experts without a gate (up, relu², down), Mamba layers, a shared expert
    "nemotron_h": dict(head_dim=16, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                       num_experts_per_tok=3, layer_types=["linear_attention", "moe", "full_attention", "moe"],
                       num_hidden_layers=4, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=1,
                       chunk_size=16, moe_shared_expert_intermediate_size=32, n_shared_experts=1),
    # Mixtral-like experts with its own router (sparsemixer)
    "phimoe": dict(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2),
}


def _checkpoint(model_type: str, path, **extra):
    config = transformers.AutoConfig.for_model(model_type, **{**_BASE, **FAMILIES.get(model_type, {}), **extra})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_(model, 0)
    model.to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=_GPU)])
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_served_bit_exactly_by_the_generic_rule(model_type, device, tmp_path):
    assert model_type not in ADAPTERS  # these rows test the generic rule
    ckpt = _checkpoint(model_type, tmp_path / "hf")
    store = convert(ckpt, tmp_path / "store", progress=False, workers=2)
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt).to(device).eval()
    for name, budget in budgets(store).items():
        model = load(store, device=device, memory_budget=budget, workers=1, preload=None if name == "all" else False)
        try:
            for batch in (1, 4):
                ids, mask = (t.to(device) for t in padded_inputs(batch))
                with torch.no_grad():
                    got, want = model(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids,
                                                                                  attention_mask=mask).logits
                    assert torch.equal(got, want), f"{name} budget, batch {batch}"
                    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
                    assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))
            assert (model.zipmoe_engine.stats.snapshot()["experts_served"] > 0) == (name != "all")
        finally:
            unload(model)


@pytest.mark.parametrize(("model_type", "extra_prefix"), [("qwen3_next", "mtp.layers.0"),
                                                         ("deepseek_v3", "model.layers.61")])
def test_multi_token_prediction_layers_are_left_out_as_from_pretrained_does(model_type, extra_prefix, tmp_path):
    """Real Qwen3-Next, DeepSeek-V3 and GLM-4.5 checkpoints carry an MTP layer (experts included) that
    transformers drops on load; it must neither be stored nor clash with layer 0's experts."""
    from safetensors.torch import load_file, save_file

    from zipmoe.report import verify_store

    ckpt = _checkpoint(model_type, tmp_path / "hf")
    shard = next(ckpt.glob("*.safetensors"))
    tensors = load_file(shard)
    gen = torch.Generator().manual_seed(7)  # not copies of layer 0: a misplaced MTP tensor must show
    mtp = {k.replace("model.layers.0", extra_prefix): (v.float() + 0.02 * torch.randn(v.shape, generator=gen))
           .to(v.dtype) for k, v in tensors.items() if ".layers.0." in k}
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # a stale buffer from_pretrained drops
    save_file({**tensors, **mtp}, str(shard), metadata={"format": "pt"})
    store = convert(ckpt, tmp_path / "store", progress=False, workers=2)
    assert verify_store(store, against=ckpt, progress=False).dense_tensors > 0
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    model = load(store, memory_budget=budgets(store)["half"], workers=1, preload=False)
    try:
        ids, mask = padded_inputs(4)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                               ref(input_ids=ids, attention_mask=mask).logits)
        assert {k.layer for k in model.zipmoe_engine.reader.entries} == {0, 1}
    finally:
        unload(model)


def test_a_layer_the_model_has_keeps_its_tensors_even_if_an_mtp_pattern_names_it():
    """GLM-4.5's drop pattern names layer 46 (the MTP layer of the 46-layer Air); its 92-layer sibling has
    a real layer 46, which from_pretrained loads."""
    from zipmoe.models.names import placements

    config = transformers.AutoConfig.for_model("glm4_moe", **{**_BASE, "num_hidden_layers": 47, "intermediate_size": 96,
                                                              "moe_intermediate_size": 32, "n_routed_experts": 4,
                                                              "num_experts_per_tok": 2, "first_k_dense_replace": 0})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    names = [f"model.layers.{layer}.{t}" for layer in (46, 47) for t in (
        "mlp.experts.3.gate_proj.weight", "mlp.gate.weight", "input_layernorm.weight")]
    placed = placements(model, names)
    assert all(placed[n].name is not None for n in names if ".46." in n)
    assert all(placed[n].name is None for n in names if ".47." in n)


def test_a_gated_checkpoint_missing_its_gates_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = _checkpoint("phimoe", tmp_path / "hf")
    shard = next(ckpt.glob("*.safetensors"))
    save_file({k: v for k, v in load_file(shard).items() if not k.endswith(("gate_proj.weight", ".w1.weight"))},
              str(shard), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="gate"):
        convert(ckpt, tmp_path / "store", progress=False, workers=1)
    assert not (tmp_path / "store").exists()


def test_dense_tensors_transformers_merges_on_load_are_refused_before_conversion(tmp_path):
    """kimi_linear's q/k/v_conv1d are concatenated by transformers on load; zipmoe stores dense tensors as
    they are, so it says so instead of writing a store that cannot load."""
    ckpt = _checkpoint("kimi_linear", tmp_path / "hf", **_MLA, intermediate_size=96, moe_intermediate_size=32,
                       num_experts=8, num_experts_per_tok=3, n_shared_experts=1,
                       layer_types=["linear_attention", "linear_attention"], mlp_layer_types=["sparse", "sparse"])
    with pytest.raises(ConversionError, match="merges or splits"):
        convert(ckpt, tmp_path / "store", progress=False, workers=1)
    assert not (tmp_path / "store").exists()


def test_experts_in_a_latent_space_with_prefetch(tmp_path):
    """nemotron_h's experts may work in a smaller latent space than the router reads: prefetch must not
    apply the next router to the latent input (it crashed), and results stay exact."""
    ckpt = _checkpoint("nemotron_h", tmp_path / "hf", moe_latent_size=32)
    store = convert(ckpt, tmp_path / "store", progress=False, workers=1)
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    model = load(store, memory_budget=budgets(store)["half"], workers=1, preload=False, prefetch=True)
    try:
        ids, mask = padded_inputs(1)
        kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True)
        with torch.no_grad():
            got, want = model.generate(ids, **kw), ref.generate(ids, **kw)
        assert torch.equal(got.sequences, want.sequences)
        assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits, strict=True))
    finally:
        unload(model)


def test_experts_without_a_gate_refuse_the_eager_reference(tmp_path):
    """NemotronHExperts' own eager loop accumulates in float32, unlike the loop zipmoe copies: say so."""
    from zipmoe.errors import UnsupportedModelError

    store = convert(_checkpoint("nemotron_h", tmp_path / "hf"), tmp_path / "store", progress=False, workers=1)
    with pytest.raises(UnsupportedModelError, match="no gate"):
        load(store, experts_implementation="eager", workers=1)


def test_a_transposed_interleaved_layout_is_refused_before_anything_is_written(tmp_path):
    """gpt_oss keeps gate_up_proj as [E, H, 2I] with gate and up interleaved (plus biases): slicing it as
    [E, 2I, H] would store wrong projections, so conversion stops with what is wrong."""
    ckpt = _checkpoint("gpt_oss", tmp_path / "hf", head_dim=16, intermediate_size=96, num_local_experts=8,
                       num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"], sliding_window=16)
    with pytest.raises(ConversionError, match="transposed or interleaved"):
        convert(ckpt, tmp_path / "store", progress=False, workers=1)
    assert not (tmp_path / "store").exists()
