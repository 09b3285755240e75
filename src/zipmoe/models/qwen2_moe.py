"""Qwen2-MoE (Qwen1.5-MoE): routed experts under mlp.experts; mlp.shared_expert stays dense.

A layer is sparse when it is not in mlp_only_layers and (layer + 1) % decoder_sparse_step == 0
(transformers Qwen2MoeDecoderLayer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from zipmoe.models.base import TableAdapter

HUB_PER_EXPERT = {
    "gate": "model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight",
    "up": "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight",
    "down": "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight",
}
FUSED = {
    "gate_up": "model.layers.{layer}.mlp.experts.gate_up_proj",
    "down": "model.layers.{layer}.mlp.experts.down_proj",
}


@dataclass(frozen=True)
class SparseStepAdapter(TableAdapter):
    """Qwen-style layer selection: decoder_sparse_step and mlp_only_layers."""

    def moe_layers(self, config: Mapping[str, Any]) -> list[int]:
        """Layers whose MLP is the sparse MoE block."""
        step = int(config.get("decoder_sparse_step", 1) or 1)
        dense = set(config.get("mlp_only_layers") or [])
        if self.num_experts(config) <= 0:
            return []
        return [
            layer
            for layer in range(int(config["num_hidden_layers"]))
            if layer not in dense and (layer + 1) % step == 0
        ]


ADAPTER = SparseStepAdapter(
    model_type="qwen2_moe",
    per_expert=HUB_PER_EXPERT,
    fused=FUSED,
    num_experts_keys=("num_experts", "num_local_experts"),
)
