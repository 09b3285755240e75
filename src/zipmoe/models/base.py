"""models/base.py: the adapter contract between HF checkpoints / transformers models and zipmoe.

Stage: `models` (above `engine`). Data in: checkpoint tensor names + config.json dicts; data out:
small frozen dataclasses naming which tensors are routed experts. No threads, no I/O.

API for the converter (import from `zipmoe.models`):
    plan = expert_tensor_plan(weight_names, config)      # config: the config.json dict
    plan.dense                  -> tuple[str, ...]     tensors stored dense, bit-identical, same names
    plan.experts[ExpertKey]     -> tuple[ProjSource, ...] in canonical order (gate, up, down)
    src.take(tensor)            -> the [rows, cols] slice of one checkpoint tensor for that projection
    plan.expert_tensors         -> frozenset of checkpoint names consumed by experts
Canonical order per routed expert: gate [I,H], up [I,H], down [H,I]; flat(gate)+flat(up) ==
transformers' fused `gate_up_proj[e]` [2I,H] (conversion_mapping.py: MergeModulelist(dim=0) then
Concatenate(dim=1) of gate, up), and down == `down_proj[e]` [H,I]. Non-gated experts (an adapter whose
`projections` is UNGATED) store up [I,H] then down [H,I].
Raises UnsupportedModelError (no adapter, generic rule finds nothing) or ConversionError (an
adapter's table is incomplete, or a model has no routed experts).

API for the engine: `ExpertSource` below; `zipmoe.models.compute.install(model, source)`.
H=hidden I=expert intermediate E=experts per layer K=top-k T=tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from zipmoe.types import ExpertKey

GATE, UP, DOWN = "gate", "up", "down"
PROJ_ORDER: tuple[str, ...] = (GATE, UP, DOWN)  # canonical order of one expert's projections
UNGATED: tuple[str, ...] = (UP, DOWN)  # a non-gated expert (act(x W_up^T) W_down^T: SwitchTransformers)


@dataclass(frozen=True, slots=True)
class ExpertName:
    """One per-expert checkpoint tensor (Hub layout): name -> (expert, projection)."""

    name: str  # checkpoint tensor name, e.g. model.layers.3.mlp.experts.7.gate_proj.weight
    key: ExpertKey  # (decoder layer index, expert index)
    proj: str  # canonical projection: gate | up | down


@dataclass(frozen=True, slots=True)
class FusedName:
    """One fused checkpoint tensor holding a projection of every expert of a layer ([E, rows, cols])."""

    name: str  # e.g. model.layers.3.mlp.experts.gate_up_proj
    layer: int  # decoder layer index
    projs: tuple[str, ...]  # row blocks of each expert slice, in order: (gate, up) or (down,)


@dataclass(frozen=True, slots=True)
class ProjSource:
    """Where one projection of one expert comes from in the checkpoint."""

    tensor: str  # checkpoint tensor name
    proj: str  # canonical projection: gate | up | down
    index: int | None = None  # expert index along dim 0 of a fused [E, ...] tensor; None: whole tensor
    part: int = 0  # which of `parts` equal row blocks (fused gate_up: gate=0, up=1)
    parts: int = 1  # number of row blocks in the (expert slice of the) tensor

    def shape_in(self, tensor_shape: Sequence[int]) -> tuple[int, ...]:
        """This projection's shape, given the shape of the whole checkpoint tensor (what take() returns)."""
        shape = tuple(tensor_shape[1:] if self.index is not None else tensor_shape)
        return (shape[0] // self.parts, *shape[1:]) if shape else shape

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """This projection's [rows, cols] view of `tensor` (the full checkpoint tensor; no copy)."""
        t = tensor if self.index is None else tensor[self.index]
        if self.parts == 1:
            return t
        rows = t.shape[0] // self.parts
        return t[self.part * rows : (self.part + 1) * rows]


@dataclass(frozen=True)
class ExpertPlan:
    """Which checkpoint tensors are routed experts (and how to slice them) and which stay dense."""

    model_type: str  # config model_type ("generic" rules may have been used, see adapter)
    adapter: str  # name of the adapter that produced the plan (a model_type or "generic")
    experts: Mapping[ExpertKey, tuple[ProjSource, ...]]  # canonical (gate, up, down) order, sorted keys
    dense: tuple[str, ...]  # every other tensor, sorted; stored unchanged
    ignored: tuple[str, ...] = ()  # tensors from_pretrained drops (no place in the model: MTP layers): not stored

    @property
    def expert_tensors(self) -> frozenset[str]:
        """Checkpoint names consumed (fully) by routed experts."""
        return frozenset(s.tensor for srcs in self.experts.values() for s in srcs)

    @property
    def moe_layers(self) -> list[int]:
        """Decoder layers that have routed experts, ascending."""
        return sorted({k.layer for k in self.experts})


class Adapter(Protocol):
    """What every per-model_type adapter provides (data, not control flow)."""

    model_type: str

    def moe_layers(self, config: Mapping[str, Any]) -> list[int]:
        """Decoder layer indices whose MLP is a routed-experts block."""
        ...

    def num_experts(self, config: Mapping[str, Any]) -> int:
        """Routed experts per MoE layer."""
        ...

    def expert_names(self, config: Mapping[str, Any]) -> list[ExpertName]:
        """Every per-expert Hub tensor name of the model, with its expert and projection."""
        ...

    def fused_names(self, config: Mapping[str, Any]) -> list[FusedName]:
        """The fused on-disk alternative (transformers' in-memory layout saved as is)."""
        ...


@runtime_checkable
class ExpertSource(Protocol):
    """What the engine implements to serve routed experts to a model installed by `compute.install`.

    `experts(layer, needed, tokens)` is called once per MoE layer call with the sorted, de-duplicated
    expert ids the router picked and how many tokens were routed to each (a hint for caching). It
    yields `(expert, gate_up, down)` for every id in `needed`, exactly once each, in any order (as
    weights become ready): gate_up is a contiguous [2I, H] tensor (gate rows
    then up rows; a non-gated expert's up [I, H]), down a contiguous [H, I] tensor, both with the model's
    dtype on the compute device.
    They may be views into engine buffers; they only need to stay valid until the generator is
    resumed for the next item (the forward is done with an expert before asking for another), so
    the engine can recycle a small set of staging buffers within one layer. An exception raised
    inside the generator (e.g. ChecksumError) propagates out of the model's forward.
    """

    def experts(self, layer: int, needed: Sequence[int],
                tokens: Sequence[int] | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield (expert id, gate_up [2I,H], down [H,I]) for each needed expert, in any order."""
        ...


@dataclass(frozen=True)
class TableAdapter:
    """An adapter written as name templates; `{layer}` and `{expert}` are filled from the config."""

    model_type: str
    per_expert: Mapping[str, str]  # canonical proj -> template of the Hub per-expert tensor name
    fused: Mapping[str, str]  # "gate_up" / "down" -> template of the fused tensor name
    num_experts_keys: tuple[str, ...]  # config keys holding the routed-experts count, first present wins

    def num_experts(self, config: Mapping[str, Any]) -> int:
        """Routed experts per MoE layer, from the first present key of num_experts_keys."""
        for key in self.num_experts_keys:
            if config.get(key):
                return int(config[key])
        return 0

    def moe_layers(self, config: Mapping[str, Any]) -> list[int]:
        """Every layer by default; adapters with dense layers override via a subclass."""
        return list(range(int(config["num_hidden_layers"])))

    def expert_names(self, config: Mapping[str, Any]) -> list[ExpertName]:
        """All per-expert names of the model, layer-major then expert then canonical projection."""
        n = self.num_experts(config)
        return [
            ExpertName(self.per_expert[p].format(layer=layer, expert=e), ExpertKey(layer, e), p)
            for layer in self.moe_layers(config)
            for e in range(n)
            for p in PROJ_ORDER
        ]

    def fused_names(self, config: Mapping[str, Any]) -> list[FusedName]:
        """The fused [E, 2I, H] gate_up and [E, H, I] down tensor names per MoE layer."""
        out = []
        for layer in self.moe_layers(config):
            out.append(FusedName(self.fused["gate_up"].format(layer=layer), layer, (GATE, UP)))
            out.append(FusedName(self.fused["down"].format(layer=layer), layer, (DOWN,)))
        return out


def group_by_expert(
    items: Iterable[tuple[ExpertKey, ProjSource]],
) -> dict[ExpertKey, tuple[ProjSource, ...]]:
    """Collect projection sources per expert in canonical order (missing ones are simply absent)."""
    acc: dict[ExpertKey, dict[str, ProjSource]] = {}
    for key, src in items:
        acc.setdefault(key, {})[src.proj] = src
    return {
        k: tuple(acc[k][p] for p in PROJ_ORDER if p in acc[k]) for k in sorted(acc)
    }


@dataclass(frozen=True)
class ModuleAdapter:
    """An adapter for models that hold each routed expert as its own nn.Module of nn.Linear layers (not
    transformers' fused experts interface): where the experts containers are, which Linear is which
    projection, and the container's forward rewritten to take weights from an ExpertSource
    (models/per_expert.py installs it). Subclasses say where the MoE layers are (containers)."""

    model_type: str
    linears: Mapping[str, str]  # canonical proj -> attribute of the expert module's nn.Linear (up -> "wi")
    projections: tuple[str, ...]  # canonical projections stored per expert, in flat-vector order
    num_experts_keys: tuple[str, ...]  # config keys holding the routed-experts count, first present wins
    # the container's forward with weights from the source: (container, *its forward's args) -> its output;
    # per_expert.install sets container._zipmoe_experts (expert j's module) and the source it reads
    experts_forward: Callable[..., torch.Tensor]
    child: str = "expert_{expert}"  # name of expert j inside its container

    def containers(self, config: Mapping[str, Any]) -> list[tuple[int, str]]:
        """(MoE layer id, module name of its experts container), ascending layer ids."""
        raise NotImplementedError

    def num_experts(self, config: Mapping[str, Any]) -> int:
        """Routed experts per MoE layer, from the first present key of num_experts_keys."""
        return next((int(config[k]) for k in self.num_experts_keys if config.get(k)), 0)

    def top_k(self, config: Mapping[str, Any]) -> int:
        """Experts each token is routed to."""
        raise NotImplementedError

    def moe_layers(self, config: Mapping[str, Any]) -> list[int]:
        """MoE layer ids (what the store's expert keys use)."""
        return [layer for layer, _ in self.containers(config)]

    def expert_names(self, config: Mapping[str, Any]) -> list[ExpertName]:
        """Every per-expert weight name, layer-major then expert then canonical projection."""
        n = self.num_experts(config)
        return [
            ExpertName(f"{name}.{self.child.format(expert=e)}.{self.linears[p]}.weight", ExpertKey(layer, e), p)
            for layer, name in self.containers(config)
            for e in range(n)
            for p in self.projections
        ]

    def fused_names(self, config: Mapping[str, Any]) -> list[FusedName]:
        """None: such checkpoints are only ever written per expert."""
        return []
