"""SwitchTransformers (encoder-decoder, top-1 routing): per-expert nn.Linear experts, not gated.

transformers keeps these experts as modules (SwitchTransformersExperts: a ModuleDict of `expert_{j}`
DenseActDense with `wi` [d_ff, d_model] and `wo` [d_model, d_ff]), not under the fused experts
interface, so models/per_expert.py serves them with the loop below. A store needs one integer per MoE
layer: encoder block b is layer b, decoder block b is layer num_layers + b.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from zipmoe.models.base import DOWN, UNGATED, UP, ModuleAdapter
from zipmoe.models.compute import combine_in_order
from zipmoe.models.per_expert import ServedExperts

_STACKS = (  # (stack, config key of its block count, config key of its sparse step, FF sublayer index)
    ("encoder", "num_layers", "encoder_sparse_step", 1),
    ("decoder", "num_decoder_layers", "decoder_sparse_step", 2),
)


def _sparse(block: int, step: int) -> bool:
    """SwitchTransformersStack's rule for which blocks hold a sparse MLP."""
    return (block % step == 1 or step == 1) if step > 0 else False


def switch_experts_forward(self: torch.nn.Module, experts: ServedExperts, hidden_states: torch.Tensor,
                           selected_experts: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
    """SwitchTransformersExperts.forward with each expert's weights served by the engine."""
    expert_mask = selected_experts.permute(2, 1, 0)  # [E, 1, T]: tokens over capacity are already masked out
    counts = expert_mask.sum(dim=(-1, -2)).tolist()  # one sync
    needed = [e for e, n in enumerate(counts) if n]  # the reference's expert_hit, ascending
    contributions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for expert, run in experts.served(needed, [counts[e] for e in needed]):
        idx, top_x = torch.where(expert_mask[expert])
        current_state = hidden_states[None, top_x].reshape(-1, hidden_states.shape[-1])
        current_hidden_states = run(current_state) * routing_weights[top_x, idx, None]
        contributions[expert] = (top_x, current_hidden_states.to(hidden_states.dtype))
    return combine_in_order(torch.zeros_like(hidden_states), needed, contributions)


@dataclass(frozen=True)
class SwitchAdapter(ModuleAdapter):
    """Sparse blocks of both stacks, by SwitchTransformersStack's own rule."""

    def containers(self, config: Mapping[str, Any]) -> list[tuple[int, str]]:
        out, offset = [], 0
        for stack, count_key, step_key, ff in _STACKS:
            blocks = int(config.get(count_key) or (config["num_layers"] if stack == "decoder" else 0))
            step = int(config.get(step_key) or 0)
            out += [(offset + b, f"{stack}.block.{b}.layer.{ff}.mlp.experts")
                    for b in range(blocks) if _sparse(b, step)]
            offset += blocks
        return out

    def top_k(self, config: Mapping[str, Any]) -> int:
        return 1  # SwitchTransformersTop1Router


ADAPTER = SwitchAdapter(
    model_type="switch_transformers",
    linears={UP: "wi", DOWN: "wo"},
    projections=UNGATED,
    num_experts_keys=("num_experts",),
    experts_forward=switch_experts_forward,
)
