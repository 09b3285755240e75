"""Tiny random MoE checkpoints, one per supported model_type, built offline for tests.

Every layer takes the routed-experts path (no dense-MLP layers); weights are N(0, 0.02) so their
BF16 exponents look like trained weights; top-k is 3-4 except Mixtral's 2 (with k=2 the eager bf16
index_add_ and grouped_mm's fp32 top-k sum round alike, so k>2 tells the references apart); mixtral
is written in several safetensors shards so sharded reading is exercised. No tokenizer: tests feed token ids.
H=hidden I=expert intermediate E=experts; sizes in bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file

# model_type -> (config class name, kwargs, max_shard_size for save_pretrained)
_COMMON: dict[str, Any] = dict(
    vocab_size=160,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2_moe": dict(
        _COMMON,
        intermediate_size=96,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_experts=8,
        num_experts_per_tok=4,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(
        _COMMON,
        head_dim=16,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=3,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
    ),
    "mixtral": dict(
        _COMMON,
        intermediate_size=32,
        num_local_experts=6,
        num_experts_per_tok=2,
    ),
    "olmoe": dict(
        _COMMON,
        num_key_value_heads=4,
        intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=3,
        norm_topk_prob=False,
        pad_token_id=None,
        eos_token_id=None,
    ),
    "deepseek_v2": dict(
        _COMMON,
        num_key_value_heads=4,
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=3,
        first_k_dense_replace=0,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=16,
        head_dim=8,
        topk_method="greedy",
        routed_scaling_factor=1.0,
    ),
}

_CONFIG_CLASSES = {
    "qwen2_moe": "Qwen2MoeConfig",
    "qwen3_moe": "Qwen3MoeConfig",
    "mixtral": "MixtralConfig",
    "olmoe": "OlmoeConfig",
    "deepseek_v2": "DeepseekV2Config",
}

# Encoder-decoder MoE models (per-expert nn.Linear experts, models/per_expert.py). Switch: 4 encoder blocks
# (sparse 1 and 3) and 2 decoder blocks (sparse 1), so a wrong decoder offset shows; a small expert capacity
# makes the router drop tokens, which the served loop must mirror.
TINY_SEQ2SEQ_CONFIGS: dict[str, dict[str, Any]] = {
    "switch_transformers": dict(
        vocab_size=160, d_model=64, d_kv=16, d_ff=48, num_layers=4, num_decoder_layers=2, num_heads=4,
        num_experts=8, num_sparse_encoder_layers=2, num_sparse_decoder_layers=1, expert_capacity=3,
        relative_attention_num_buckets=8, tie_word_embeddings=True, decoder_start_token_id=0,
    ),
}
_CONFIG_CLASSES["switch_transformers"] = "SwitchTransformersConfig"

# mixtral is written in several shards (its experts alone are ~220 KiB) to exercise sharded reading.
_SHARD_SIZE = {"mixtral": "100KB"}


def tiny_config(model_type: str) -> transformers.PretrainedConfig:
    """The transformers config object for one row of TINY_CONFIGS or TINY_SEQ2SEQ_CONFIGS."""
    cls = getattr(transformers, _CONFIG_CLASSES[model_type])
    return cls(**(TINY_CONFIGS.get(model_type) or TINY_SEQ2SEQ_CONFIGS[model_type]))


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Matrices ~ N(0, 0.02) (real-looking BF16 exponents); norms 1 + N(0, 0.02); biases N(0, 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.02
            if p.ndim == 1 and "norm" in name:
                noise += 1.0
            p.copy_(noise.to(p.dtype))


def build_tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """A randomly initialised tiny causal LM (seq2seq LM for TINY_SEQ2SEQ_CONFIGS; eval mode) of this model_type."""
    config = tiny_config(model_type)
    auto = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
    with torch.device("cpu"):
        model = auto.from_config(config, dtype=torch.float32)
    _randomize_(model, seed)
    return model.to(dtype).eval()


def build_tiny_checkpoint(
    model_type: str, path: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Write a tiny random checkpoint (config.json + safetensors, sharded for mixtral) to path."""
    path = Path(path)
    model = build_tiny_model(model_type, seed, dtype)
    model.generation_config.pad_token_id = None
    model.save_pretrained(path, max_shard_size=_SHARD_SIZE.get(model_type, "50MB"))
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every tensor of a checkpoint directory (all shards) and its config.json."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors, json.loads((path / "config.json").read_text())
