"""expert_tensor_plan: which checkpoint tensors are routed experts (sliced how) and which stay dense.

Called by the converter with the checkpoint's tensor names (all shards) and its config.json dict.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from zipmoe.engine.engine import ExpertShapes
from zipmoe.errors import ConversionError, UnsupportedModelError
from zipmoe.models.base import (
    GATE,
    PROJ_ORDER,
    UNGATED,
    ExpertPlan,
    FusedName,
    ModuleAdapter,
    ProjSource,
    group_by_expert,
)
from zipmoe.models.compute import check_layout, experts_modules
from zipmoe.models.generic import FUSED_RE, PER_EXPERT_RE, GenericAdapter
from zipmoe.models.names import merged_dense_message, meta_model, placements
from zipmoe.models.registry import get_adapter, unsupported_message
from zipmoe.types import ExpertKey

log = logging.getLogger("zipmoe")


def expert_tensor_plan(
    weight_names: Iterable[str],
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> ExpertPlan:
    """Split a checkpoint's tensors into routed experts and dense tensors.

    shapes (optional, name -> shape) gives the expert count of fused tensors; otherwise the config's.
    """
    names = set(weight_names)
    model_type = config.get("model_type")
    adapter = get_adapter(model_type)
    if isinstance(adapter, GenericAdapter):
        per, fused = adapter.discover(names)
    else:
        per = [n for n in adapter.expert_names(config) if n.name in names]
        fused = [f for f in adapter.fused_names(config) if f.name in names]
    items = [(n.key, ProjSource(n.name, n.proj)) for n in per]
    for f in fused:
        items.extend(_fused_items(f, _fused_count(f, adapter.num_experts(config), shapes)))
    _check_no_duplicates(items)
    experts = group_by_expert(items)
    used = {src.tensor for _, src in items}
    _check_leftovers(names - used, model_type, adapter)
    if not experts:
        _raise_no_experts(model_type, adapter, config)
    _check_complete(experts, adapter, config)
    if shapes is not None:  # refuse what the engine cannot serve now, not after a long conversion
        for key, srcs in experts.items():
            ExpertShapes.from_projections({s.proj: s.shape_in(shapes[s.tensor]) for s in srcs}, str(key))
    return ExpertPlan(
        model_type=str(model_type),
        adapter=adapter.model_type,
        experts=experts,
        dense=tuple(sorted(names - used)),
    )


def checkpoint_plan(root: str | Path, weight_names: Iterable[str], config: Mapping[str, Any],
                    shapes: Mapping[str, tuple[int, ...]] | None = None) -> ExpertPlan:
    """expert_tensor_plan for a checkpoint directory, checked against the model transformers builds from it,
    so that a checkpoint the engine cannot load is refused before hours of conversion: tensors from_pretrained
    drops (multi-token-prediction layers, stale buffers) are left out (`ignored`); the experts must have the
    layout the model's experts modules expect; no dense tensor may need transformers' merging on load."""
    names = set(weight_names)
    model = meta_model(root)
    if model is None:
        return expert_tensor_plan(names, config, shapes)
    placed = placements(model, names)
    dropped = sorted(k for k, p in placed.items() if p.name is None)
    if dropped:
        log.info("%d checkpoint tensors have no place in %s and are left out, as from_pretrained drops them "
                 "(e.g. %s)", len(dropped), type(model).__name__, dropped[0])
    plan = expert_tensor_plan(names - set(dropped), config, shapes)
    merged = [k for k in plan.dense if placed[k].converted]
    if merged:
        raise UnsupportedModelError(merged_dense_message(model, merged[0]))
    _check_against_modules(model, plan)
    return dataclasses.replace(plan, ignored=tuple(dropped))


def _check_against_modules(model: Any, plan: ExpertPlan) -> None:
    """The fused experts modules must take what the plan stores: their layout, and gate or not."""
    for layer, name, module in experts_modules(model):
        check_layout(name, module)
        srcs = plan.experts.get(ExpertKey(layer, 0))
        if srcs is not None and (GATE in {s.proj for s in srcs}) != getattr(module, "has_gate", True):
            have = ", ".join(s.proj for s in srcs)
            raise ConversionError(
                f"layer {layer}: the checkpoint's experts have projections ({have}) but {type(module).__name__} "
                f"is {'gated' if getattr(module, 'has_gate', True) else 'not gated'}: the checkpoint is incomplete "
                "or config.json belongs to another model"
            )


def _fused_count(f: FusedName, configured: int, shapes: Mapping[str, tuple[int, ...]] | None) -> int:
    if shapes is not None and f.name in shapes:
        return int(shapes[f.name][0])
    if configured <= 0:
        raise ConversionError(
            f"fused expert tensor {f.name!r}: the expert count is unknown; pass shapes= or set num_experts "
            "in config.json"
        )
    return configured


def _fused_items(f: FusedName, count: int) -> list[tuple[ExpertKey, ProjSource]]:
    parts = len(f.projs)
    return [
        (ExpertKey(f.layer, e), ProjSource(f.name, p, index=e, part=i, parts=parts))
        for e in range(count)
        for i, p in enumerate(f.projs)
    ]


def _check_no_duplicates(items: list[tuple[ExpertKey, ProjSource]]) -> None:
    seen: dict[tuple[ExpertKey, str], str] = {}
    for key, src in items:
        other = seen.setdefault((key, src.proj), src.tensor)
        if other != src.tensor:
            raise ConversionError(
                f"{key} {src.proj} projection appears twice, in {other!r} and {src.tensor!r}: the checkpoint "
                "mixes per-expert and fused layouts; keep one of them"
            )


def _check_leftovers(leftover: set[str], model_type: Any, adapter: Any) -> None:
    """No tensor that looks like a routed expert's may be left to the dense part."""
    child = None
    if isinstance(adapter, ModuleAdapter):  # e.g. "...experts.expert_7.wi.weight"
        child = re.compile(r"(?:^|\.)" + re.escape(adapter.child).replace(r"\{expert\}", r"\d+") + r"\.")
    odd = sorted(n for n in leftover if PER_EXPERT_RE.match(n) or FUSED_RE.match(n) or (child and child.search(n)))
    if odd:
        raise ConversionError(
            f"model_type {model_type!r}: {len(odd)} tensor(s) look like routed experts but do not match the "
            f"adapter's layout (first: {odd[0]!r}); the checkpoint may be for another model_type or "
            "layer configuration"
        )


def _raise_no_experts(model_type: Any, adapter: Any, config: Mapping[str, Any]) -> None:
    if isinstance(adapter, GenericAdapter):
        raise UnsupportedModelError(
            unsupported_message(model_type, "no routed experts found by the generic naming rule")
        )
    expected = adapter.expert_names(config)
    like = repr(expected[0].name) if expected else "none: the config names no MoE layer"
    raise ConversionError(
        f"model_type {model_type!r}: no routed experts found (expected tensors like {like}); "
        "is this a MoE checkpoint with num_experts > 0?"
    )


def _check_complete(experts: Mapping[ExpertKey, tuple[ProjSource, ...]], adapter: Any, config: Any) -> None:
    """Every expert has the adapter's projections (gate, up, down unless it says otherwise); every layer
    the same contiguous expert ids 0..E-1."""
    want = getattr(adapter, "projections", PROJ_ORDER)
    if isinstance(adapter, GenericAdapter):  # gated, or up and down alone if the first expert says so (whether
        first = tuple(s.proj for s in next(iter(experts.values())))  # the model agrees: checkpoint_plan)
        want = UNGATED if first == UNGATED else PROJ_ORDER
    for key, srcs in experts.items():
        if tuple(s.proj for s in srcs) != want:
            have = ", ".join(s.proj for s in srcs)
            raise ConversionError(
                f"{key}: found projections ({have}) but this model's experts need {', '.join(want)}; "
                "the checkpoint is incomplete or another model_type's"
            )
    by_layer: dict[int, list[int]] = {}
    for key in experts:
        by_layer.setdefault(key.layer, []).append(key.expert)
    want_layers = adapter.moe_layers(config) or sorted(by_layer)
    want_n = adapter.num_experts(config) or len(next(iter(by_layer.values())))
    for layer in want_layers:
        got = sorted(by_layer.get(layer, []))
        if got != list(range(want_n)):
            missing = sorted(set(range(want_n)) - set(got))[:5]
            raise ConversionError(
                f"layer {layer}: expected routed experts 0..{want_n - 1}, missing e.g. {missing}; "
                "the checkpoint is incomplete (a shard missing?) or config.json does not match it"
            )
    extra = sorted(set(by_layer) - set(want_layers))
    if extra:
        raise ConversionError(f"routed experts found in layers {extra} which config.json says are dense")

