"""OLMoE: every layer is MoE; experts under mlp.experts with gate/up/down_proj names."""

from __future__ import annotations

from zipmoe.models.base import TableAdapter
from zipmoe.models.qwen2_moe import FUSED, HUB_PER_EXPERT

ADAPTER = TableAdapter(
    model_type="olmoe",
    per_expert=HUB_PER_EXPERT,
    fused=FUSED,
    num_experts_keys=("num_experts",),
)
