"""Mixtral: Hub checkpoints name experts block_sparse_moe.experts.{j}.w1/w3/w2 (= gate/up/down).

transformers renames block_sparse_moe -> mlp on load (conversion_mapping.py "mixtral"), so the
fused in-memory layout lives under mlp.experts.
"""

from __future__ import annotations

from zipmoe.models.base import TableAdapter
from zipmoe.models.qwen2_moe import FUSED

ADAPTER = TableAdapter(
    model_type="mixtral",
    per_expert={
        "gate": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
        "up": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
        "down": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
    },
    fused=FUSED,
    num_experts_keys=("num_local_experts", "num_experts"),
)
