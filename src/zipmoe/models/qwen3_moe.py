"""Qwen3-MoE: same expert layout and layer selection as Qwen2-MoE, no shared expert.

transformers 5.x writes the expert count as num_local_experts; Hub configs use num_experts.
"""

from __future__ import annotations

from zipmoe.models.qwen2_moe import FUSED, HUB_PER_EXPERT, SparseStepAdapter

ADAPTER = SparseStepAdapter(
    model_type="qwen3_moe",
    per_expert=HUB_PER_EXPERT,
    fused=FUSED,
    num_experts_keys=("num_experts", "num_local_experts"),
)
