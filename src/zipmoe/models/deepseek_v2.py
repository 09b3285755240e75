"""DeepSeek-V2: layers >= first_k_dense_replace are MoE; mlp.shared_experts stays resident dense."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from zipmoe.models.base import TableAdapter
from zipmoe.models.qwen2_moe import FUSED, HUB_PER_EXPERT


@dataclass(frozen=True)
class FirstKDenseAdapter(TableAdapter):
    """The first `first_k_dense_replace` layers have a dense MLP (DeepseekV2DecoderLayer)."""

    def moe_layers(self, config: Mapping[str, Any]) -> list[int]:
        """Layers first_k_dense_replace .. num_hidden_layers - 1."""
        first = int(config.get("first_k_dense_replace", 0) or 0)
        return list(range(first, int(config["num_hidden_layers"])))


ADAPTER = FirstKDenseAdapter(
    model_type="deepseek_v2",
    per_expert=HUB_PER_EXPERT,
    fused=FUSED,
    num_experts_keys=("n_routed_experts", "num_experts"),
)
