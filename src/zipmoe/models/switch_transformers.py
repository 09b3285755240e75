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
import transformers
from torch import nn

from zipmoe.models.base import DOWN, UNGATED, UP, ModuleAdapter
from zipmoe.models.compute import combine_in_order, experts_of, routing_to_host


def dense_act_dense(expert: nn.Module, x: torch.Tensor, wi: torch.Tensor, wo: torch.Tensor) -> torch.Tensor:
    """SwitchTransformersDenseActDense.forward with its two weights passed in (nn.Linear is F.linear)."""
    h = expert.dropout(expert.act(nn.functional.linear(x, wi)))
    if h.dtype != wo.dtype and wo.dtype != torch.int8:
        h = h.to(wo.dtype)
    return nn.functional.linear(h, wo)


def switch_experts_forward(self: nn.Module, hidden_states: torch.Tensor, selected_experts: torch.Tensor,
                           routing_weights: torch.Tensor) -> torch.Tensor:
    """SwitchTransformersExperts.forward with each expert's weights served by the engine."""
    expert_mask = selected_experts.permute(2, 1, 0)  # [E, 1, T]: tokens over capacity are already masked out
    counts = routing_to_host(self, expert_mask.sum(dim=(-1, -2)))  # one sync
    needed = [e for e, n in enumerate(counts) if n]  # the reference's expert_hit, ascending
    contributions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for expert, wi, wo in experts_of(self, needed, [counts[e] for e in needed]):
        idx, top_x = torch.where(expert_mask[expert])
        current_state = hidden_states[None, top_x].reshape(-1, hidden_states.shape[-1])
        current_hidden_states = dense_act_dense(self._zipmoe_experts[expert], current_state, wi, wo)
        current_hidden_states = current_hidden_states * routing_weights[top_x, idx, None]
        contributions[expert] = (top_x, current_hidden_states.to(hidden_states.dtype))
    return combine_in_order(torch.zeros_like(hidden_states), needed, contributions)


def _stacks(config: Mapping[str, Any]) -> list[tuple[str, int, int, int]]:
    """(stack, blocks, sparse step, FF sublayer index) as SwitchTransformersConfig derives them: it
    recomputes the steps from num_sparse_*_layers (defaults included), whatever config.json says."""
    cfg = transformers.SwitchTransformersConfig(**{k: v for k, v in config.items() if k != "model_type"})
    return [("encoder", cfg.num_layers, cfg.encoder_sparse_step, 1),
            ("decoder", cfg.num_decoder_layers, cfg.decoder_sparse_step, 2)]


def _sparse(block: int, step: int) -> bool:
    """SwitchTransformersStack's rule for which blocks hold a sparse MLP."""
    return (block % step == 1 or step == 1) if step > 0 else False


@dataclass(frozen=True)
class SwitchAdapter(ModuleAdapter):
    """Sparse blocks of both stacks, by SwitchTransformersStack's own rule."""

    def containers(self, config: Mapping[str, Any]) -> list[tuple[int, str]]:
        out, offset = [], 0
        for stack, blocks, step, ff in _stacks(config):
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
