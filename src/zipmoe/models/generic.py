"""Generic rule for HF MoE checkpoints without a dedicated adapter.

Routed experts are recognised by the usual naming, `...layers.{l}.<path>.experts.{j}.<proj>.weight`
with <proj> in gate_proj/up_proj/down_proj (or Mixtral-style w1/w3/w2), or the fused
`...layers.{l}.<path>.experts.gate_up_proj` / `.down_proj` (GraniteMoe's checkpoints:
`block_sparse_moe.input_linear.weight` / `output_linear.weight`, which transformers renames to those).
Experts without a gate (nemotron_h) have up and down only, per expert or fused (`experts.up_proj`).
A path segment must be exactly `experts`, so `shared_experts` / `shared_expert` stay dense.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from zipmoe.models.base import DOWN, GATE, UP, ExpertName, FusedName
from zipmoe.types import ExpertKey

PER_EXPERT_RE = re.compile(
    r"^.*?\blayers\.(?P<layer>\d+)\.(?:\w+\.)+?experts\.(?P<expert>\d+)\."
    r"(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$"
)
FUSED_RE = re.compile(
    r"^.*?\blayers\.(?P<layer>\d+)\.(?:(?:\w+\.)+?experts\.(?P<proj>gate_up_proj|up_proj|down_proj)"
    r"|block_sparse_moe\.(?P<proj_linear>input_linear|output_linear)\.weight)$"  # anchored: not shared_mlp's
)
_PROJ = {"gate_proj": GATE, "w1": GATE, "up_proj": UP, "w3": UP, "down_proj": DOWN, "w2": DOWN}
_FUSED_PROJS = {"gate_up_proj": (GATE, UP), "up_proj": (UP,), "down_proj": (DOWN,), "input_linear": (GATE, UP),
                "output_linear": (DOWN,)}
NUM_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


class GenericAdapter:
    """Name-pattern adapter: experts are discovered from the checkpoint's tensor names."""

    model_type = "generic"

    def num_experts(self, config: Mapping[str, Any]) -> int:
        """Routed experts per layer from the usual config keys (0 when none is set)."""
        for key in NUM_EXPERTS_KEYS:
            if config.get(key):
                return int(config[key])
        return 0

    def moe_layers(self, config: Mapping[str, Any]) -> list[int]:
        """Unknown from the config alone: the plan derives them from tensor names."""
        return []

    def expert_names(self, config: Mapping[str, Any]) -> list[ExpertName]:
        """Unknown from the config alone; see discover()."""
        return []

    def fused_names(self, config: Mapping[str, Any]) -> list[FusedName]:
        """Unknown from the config alone; see discover()."""
        return []

    def discover(self, names: Iterable[str]) -> tuple[list[ExpertName], list[FusedName]]:
        """The per-expert and fused expert tensors among `names`, by naming convention."""
        per, fused = [], []
        for name in sorted(names):
            if m := PER_EXPERT_RE.match(name):
                key = ExpertKey(int(m["layer"]), int(m["expert"]))
                per.append(ExpertName(name, key, _PROJ[m["proj"]]))
            elif m := FUSED_RE.match(name):
                fused.append(FusedName(name, int(m["layer"]), _FUSED_PROJS[m["proj"] or m["proj_linear"]]))
        return per, fused


ADAPTER = GenericAdapter()
