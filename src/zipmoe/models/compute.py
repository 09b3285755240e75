"""models/compute.py: the "zipmoe" experts implementation — routed experts served by an ExpertSource.

Stage: models (the arrow engine → transformers). Runs on the thread that calls model.forward.
In: the experts module's (hidden_states [T,H], top_k_index [T,K], top_k_weights [T,K]) and the
weights the engine yields per needed expert (gate_up [2I,H], or up [I,H] for experts without a gate;
down [H,I]); out: [T,H] that is
torch.equal to transformers' own "eager" or "grouped_mm" forward over the full expert tensors.
Each expert's matmuls run as soon as its weights arrive (any order); everything whose rounding
depends on order or on tensor extent (index_add_ order, activations, the top-k sum) runs afterwards
on tensors of exactly the reference's shape, in the reference's order.
T=tokens K=top-k S=T*K routed slots H=hidden I=expert intermediate E=experts.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers.integrations import moe as _hf_moe
from transformers.integrations.moe import ExpertsInterface, _batched_linear, _grouped_linear

from zipmoe.errors import UnsupportedModelError
from zipmoe.models.base import ExpertSource

IMPLEMENTATION = "zipmoe"  # the name registered in transformers' ExpertsInterface
REFERENCES = ("eager", "grouped_mm", "batched_mm")  # reference implementations we are bit-exact to
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
INDEX_COPY_MIN_SLOTS = 2  # batched_mm: an expert routed to this many slots or more is copied by one index_copy_


def experts_of(self: nn.Module, needed: list[int],
               tokens: list[int]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The installed source's (expert, gate_up, down) stream for this module's layer call."""
    source: ExpertSource = self._zipmoe_source
    if self._zipmoe_takes_tokens:
        return source.experts(self._zipmoe_layer, needed, tokens=tokens)
    return source.experts(self._zipmoe_layer, needed)  # a source written before the tokens hint


def routing_to_host(self: nn.Module, routed: torch.Tensor) -> list:
    """routed.tolist(), a device→host sync of the routing. When the source traces (benchmarks' --trace) it
    is told how long the sync blocked: the device's backlog as the layer asks for its experts (attention,
    router, the previous layer's copies), which separates device from host time between layers
    (bench/metrics.trace_summary)."""
    source = self._zipmoe_source
    if getattr(source, "trace", None) is None:
        return routed.tolist()
    start = time.perf_counter()
    out = routed.tolist()
    source.sync_wait_s += time.perf_counter() - start
    return out


def takes_tokens(source: ExpertSource) -> bool:
    """Whether source.experts accepts the `tokens` hint (added after the first release of the interface)."""
    try:
        params = inspect.signature(source.experts).parameters
    except (TypeError, ValueError):
        return False
    return "tokens" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def eager_like_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' eager experts loop (Qwen2MoeExperts.forward et al.) with weights from the source."""
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
        expert_mask = expert_mask.permute(2, 1, 0)
        counts = routing_to_host(self, expert_mask.sum(dim=(-1, -2)))  # tokens per expert (+ padding class)
    needed = [e for e, n in enumerate(counts[: self.num_experts]) if n]  # the reference's expert_hit, ascending
    contributions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for expert, gate_up, down in experts_of(self, needed, [counts[e] for e in needed]):
        top_k_pos, token_idx = torch.where(expert_mask[expert])
        current_state = hidden_states[token_idx]
        gate, up = nn.functional.linear(current_state, gate_up).chunk(2, dim=-1)
        current_hidden_states = self.act_fn(gate) * up
        current_hidden_states = nn.functional.linear(current_hidden_states, down)
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        contributions[expert] = (token_idx, current_hidden_states.to(final_hidden_states.dtype))
    return combine_in_order(final_hidden_states, needed, contributions)


def combine_in_order(out: torch.Tensor, needed: list[int],
                     contributions: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """index_add_ each expert's (token rows, output) into `out` in the reference's ascending expert order
    (index_add_ rounds per call), once the source has served exactly `needed`."""
    check_served(needed, contributions)
    for expert in needed:
        out.index_add_(0, *contributions[expert])
    return out


def grouped_mm_like_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' grouped_mm_experts_forward, one single-group grouped_mm per served expert."""
    num_top_k = top_k_index.size(-1)
    num_tokens, hidden_dim = hidden_states.size(0), hidden_states.size(-1)
    sample_weights = top_k_weights.reshape(-1)  # (S,)
    expert_ids_g, perm = torch.sort(top_k_index.reshape(-1))
    selected_hidden_states_g = hidden_states[perm // num_top_k]
    sample_weights_g = sample_weights[perm]
    spans = _group_spans(self, expert_ids_g)  # expert -> (start, end) in sorted slots
    needed = sorted(spans)
    down_out = hidden_states.new_empty(expert_ids_g.numel(), hidden_dim)
    served: dict[int, bool] = {}
    for expert, gate_up, down in experts_of(self, needed, [spans[e][1] - spans[e][0] for e in needed]):
        start, end = spans[expert]
        # The gate activation is elementwise along rows, so applying it to this expert's row block
        # gives the same bits as the reference's whole-(S, 2I) call (tested); the weights can then
        # be released as soon as the source is resumed.
        proj_out = _activate(self, _one_group_linear(selected_hidden_states_g[start:end], gate_up))
        down_out[start:end] = _one_group_linear(proj_out, down)
        served[expert] = True
    check_served(needed, served)
    weighted_out = down_out * sample_weights_g.unsqueeze(-1)  # (S, H)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=hidden_states.device)
    weighted_out = weighted_out[inv_perm]
    final_hidden_states = weighted_out.view(num_tokens, num_top_k, hidden_dim).sum(dim=1)
    return final_hidden_states.to(hidden_states.dtype)


def batched_mm_like_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' batched_mm_experts_forward (what generate() decodes with on a GPU) on the same
    [S, out, in] weight stacks: each served expert is copied into the slots routed to it as it arrives
    (one copy per weight, whatever the number of slots), then the reference's two bmm calls run on tensors
    of exactly its shapes. The stacks hold S experts for the call's duration, as the reference's own
    gather does."""
    num_top_k = top_k_index.size(-1)
    num_tokens, hidden_dim = hidden_states.size(0), hidden_states.size(-1)
    selected_hidden_states = hidden_states.repeat_interleave(num_top_k, dim=0)
    sample_weights = top_k_weights.reshape(-1)  # (S,)
    slots: dict[int, list[int]] = {}
    for s, expert in enumerate(routing_to_host(self, top_k_index.reshape(-1))):
        slots.setdefault(expert, []).append(s)
    needed = sorted(slots)
    n = len(sample_weights)
    gate_up_w = hidden_states.new_empty(n, *getattr(self, in_proj(self)).shape[1:])
    down_w = hidden_states.new_empty(n, *self.down_proj.shape[1:])
    shared = _slot_indices(slots, hidden_states.device)
    served: dict[int, bool] = {}
    for expert, gate_up, down in experts_of(self, needed, [len(slots[e]) for e in needed]):
        index = shared.get(expert)
        if index is None:  # routed to fewer slots than INDEX_COPY_MIN_SLOTS
            for s in slots[expert]:
                gate_up_w[s].copy_(gate_up)
                down_w[s].copy_(down)
        else:  # one kernel per weight, not one per slot: each launch is compute-thread Python the loaders wait on
            gate_up_w.index_copy_(0, index, gate_up.expand(index.numel(), -1, -1))
            down_w.index_copy_(0, index, down.expand(index.numel(), -1, -1))
        served[expert] = True
    check_served(needed, served)
    proj_out = _activate(self, _batched_linear(selected_hidden_states, gate_up_w, bias=None, is_transposed=False))
    proj_out = _batched_linear(proj_out, down_w, bias=None, is_transposed=False)
    weighted_out = proj_out * sample_weights.unsqueeze(-1)  # (S, H)
    final_hidden_states = weighted_out.view(num_tokens, num_top_k, hidden_dim).sum(dim=1)
    return final_hidden_states.to(hidden_states.dtype)


def _slot_indices(slots: dict[int, list[int]], device: torch.device) -> dict[int, torch.Tensor]:
    """expert -> its slots as an index on `device`, for experts routed to INDEX_COPY_MIN_SLOTS or more; one
    host→device copy for the whole call (to_device_async)."""
    multi = [(e, s) for e, s in slots.items() if len(s) >= INDEX_COPY_MIN_SLOTS]
    if not multi:
        return {}
    flat = to_device_async(torch.tensor([i for _, s in multi for i in s], dtype=torch.int64), device)
    out, at = {}, 0
    for expert, s in multi:
        out[expert] = flat[at : at + len(s)]
        at += len(s)
    return out


def to_device_async(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without waiting for the stream: on CUDA copied from pinned memory with
    non_blocking (the caching host allocator keeps the block until the copy has run); a pageable `.to(cuda)`
    would synchronise, making the layer wait for every kernel queued before it."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def in_proj(module: nn.Module) -> str:
    """The experts module's first weight: gate_up_proj [E, 2I, H], or up_proj [E, I, H] when not gated."""
    return "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"


def _activate(self: nn.Module, proj_out: torch.Tensor) -> torch.Tensor:
    """transformers' rule after the first projection: gated experts apply their gate, others the activation."""
    return self._apply_gate(proj_out) if getattr(self, "has_gate", True) else self.act_fn(proj_out)


def _one_group_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The reference's grouped_mm kernel on one group: weight [out, in] viewed as [1, out, in]."""
    offs = torch.full((1,), x.size(0), dtype=torch.int32, device=x.device)  # a fill kernel: no host sync
    return _grouped_linear(x, weight.unsqueeze(0), offs, bias=None, is_transposed=False)


def _group_spans(self: nn.Module, sorted_ids: torch.Tensor) -> dict[int, tuple[int, int]]:
    """Slot range of each routed expert in the sorted order (one device→host sync, like the reference)."""
    num_experts = self.num_experts
    counts = routing_to_host(self, torch.bincount(sorted_ids, minlength=num_experts)[:num_experts])
    spans, start = {}, 0
    for expert, n in enumerate(counts):
        if n:
            spans[expert] = (start, start + n)
        start += n
    return spans


def check_served(needed: list[int], served: dict) -> None:
    if sorted(served) != needed:
        missing = sorted(set(needed) - set(served))
        raise RuntimeError(f"ExpertSource did not serve experts {missing} (asked for {needed})")


_FORWARDS: dict[str, Callable[..., torch.Tensor]] = {
    "eager": eager_like_forward,
    "grouped_mm": grouped_mm_like_forward,
    "batched_mm": batched_mm_like_forward,
}


@dataclass(frozen=True)
class NextRouter:
    """The next MoE layer's router weights, to guess its experts from this layer's hidden states."""

    layer: int  # decoder layer index of the next MoE layer
    weight: torch.Tensor  # [E, H] router weight (not a copy)
    top_k: int  # experts per token


PREFETCH_MAX_TOKENS = 4  # hint only for decode-sized calls; a prefill needs nearly every expert anyway


def _hint_next_layer(self: nn.Module, hidden_states: torch.Tensor) -> None:
    """Tell the source which experts the next MoE layer will probably need (read-only: never changes
    this layer's output). Applies the next layer's router to this layer's input hidden states."""
    nxt: NextRouter | None = self._zipmoe_next
    hint = getattr(self._zipmoe_source, "hint", None)
    if nxt is None or hint is None or hidden_states.shape[0] > PREFETCH_MAX_TOKENS:
        return
    with torch.no_grad():
        logits = nn.functional.linear(hidden_states.to(nxt.weight.dtype), nxt.weight)
        ids = routing_to_host(self, torch.topk(logits, nxt.top_k, dim=-1).indices.flatten())
    hint(nxt.layer, list(dict.fromkeys(ids)))  # unique, in rank order of the first token


def zipmoe_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The registered "zipmoe" implementation: dispatch to the reference picked at install time (or the
    one generate() decodes with, see _follow_decode_switch), or run the reference itself when the
    module's weights are resident (serve_resident)."""
    decoding = self._zipmoe_owner in getattr(_DECODING, "models", ())
    if self._zipmoe_resident is not None:
        forward = self._zipmoe_resident[decoding]
        return forward(self, hidden_states, top_k_index, top_k_weights)
    # traced (benchmarks): when this forward was entered and left, which splits the gap between two layers'
    # expert loads into our code around them and the model's own (attention, router, shared expert)
    source = self._zipmoe_source
    traced = getattr(source, "trace", None) is not None
    if traced:
        source.forward_entered_at = time.perf_counter()
    _hint_next_layer(self, hidden_states)
    out = self._zipmoe_forward[decoding](self, hidden_states, top_k_index, top_k_weights)
    if traced:
        source.forward_left_at = time.perf_counter()
    return out


ExpertsInterface.register(IMPLEMENTATION, zipmoe_experts_forward)


def experts_modules(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """(decoder layer, module name, module) of every fused experts module driven by the interface."""
    found = []
    for name, module in model.named_modules():
        if all(hasattr(module, a) for a in ("is_concatenated", in_proj(module), "down_proj")):
            m = _LAYER_RE.search(name + ".")
            if m is None:
                raise UnsupportedModelError(f"experts module {name!r} is not under a '.layers.<n>.' path")
            found.append((int(m.group(1)), name, module))
    return found


def _next_routers(model: nn.Module, modules: list[tuple[int, str, nn.Module]]) -> dict[int, NextRouter]:
    """layer -> the following MoE layer's router (the experts module's sibling `gate` with a 2-D weight)."""
    top_k = getattr(model.config, "num_experts_per_tok", None)
    gates = []
    for layer, name, module in sorted(modules, key=lambda m: m[0]):
        gate = getattr(model.get_submodule(name.rsplit(".", 1)[0]), "gate", None)
        weight = getattr(gate, "weight", None)
        k = getattr(gate, "top_k", None) or top_k
        width = getattr(module, in_proj(module)).shape[-1]  # what the experts see (a latent size, nemotron_h)
        gates.append((layer, weight if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None, k, width))
    return {  # a router that reads another width than this layer's experts input cannot be applied to it
        layer: NextRouter(nxt, weight, int(k))
        for (layer, _, _, width), (nxt, weight, k, _) in itertools.pairwise(gates)
        if weight is not None and isinstance(k, int) and weight.shape[1] == width
    }


def check_layout(name: str, module: nn.Module, reference: str = "grouped_mm") -> None:
    """Only the standard layout (concatenated [gate; up] or up alone, not transposed, no bias, no post-norm).
    Experts without a gate (nemotron_h) only against grouped_mm / batched_mm: those are transformers'
    shared functions, while each such class writes its own eager loop (NemotronHExperts accumulates in
    float32), which eager_like_forward does not copy."""
    odd = [
        flag
        for flag, want in (("is_concatenated", True), ("is_transposed", False), ("has_bias", False),
                           ("has_post_expert_norm", False))
        if getattr(module, flag, want) != want
    ]
    if odd:
        raise UnsupportedModelError(
            f"experts module {name!r} ({type(module).__name__}) uses a layout zipmoe does not serve yet "
            f"({', '.join(odd)}); only concatenated, non-transposed experts without bias are supported"
        )
    if not getattr(module, "has_gate", True) and reference == "eager":
        raise UnsupportedModelError(
            f"experts module {name!r} ({type(module).__name__}) has no gate: zipmoe serves such experts bit-exactly "
            "to experts_implementation 'grouped_mm' (the default) or 'batched_mm', not to its own eager loop"
        )


def installed_source(model: nn.Module) -> ExpertSource | None:
    """The ExpertSource serving `model`'s experts (None: zipmoe did not install one)."""
    sources = {id(m._zipmoe_source): m._zipmoe_source for m in model.modules() if hasattr(m, "_zipmoe_source")}
    if len(sources) > 1:
        raise UnsupportedModelError(f"{type(model).__name__}'s experts modules are served by {len(sources)} "
                                    "different sources; zipmoe installs one per model")
    return next(iter(sources.values()), None)


def replace_source(model: nn.Module, source: ExpertSource) -> None:
    """Serve every installed experts module from `source` instead (e.g. a wrapper around the old one)."""
    if installed_source(model) is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no experts modules installed by zipmoe")
    for module in model.modules():
        if hasattr(module, "_zipmoe_source"):
            module._zipmoe_source = source
            module._zipmoe_takes_tokens = takes_tokens(source)


def _reference_forward(module: nn.Module, reference: str) -> Callable[..., torch.Tensor]:
    """transformers' own forward for `reference`: the interface's function, or the class's undecorated
    forward for "eager" (what @use_experts_implementation dispatches to)."""
    original = getattr(type(module).forward, "__wrapped__", None)
    if original is None:
        raise UnsupportedModelError(f"{type(module).__name__}.forward is not the experts-interface wrapper")
    interface = getattr(_hf_moe, "ALL_EXPERTS_FUNCTIONS", None) or ExpertsInterface()
    return interface.get_interface(reference, original)  # transformers' own dispatch


def serve_resident(model: nn.Module, source: ExpertSource) -> bool:
    """If the source holds every expert decoded in place for good (everything fits), hand the views to the
    experts modules as their weights and run transformers' own implementation on them: the same kernels
    on the same bytes as plain from_pretrained, so no per-expert work per step. False: nothing changed."""
    resident = getattr(source, "resident_weights", None)
    modules = experts_modules(model)
    if resident is None or not modules:
        return False
    weights = [resident(layer, module.down_proj.shape[0]) for layer, _, module in modules]
    if any(w is None for w in weights):
        return False
    reference = model._zipmoe_reference
    try:
        forwards = [(_reference_forward(module, reference), _reference_forward(module, _decode_reference(reference)))
                    for _, _, module in modules]
    except UnsupportedModelError:  # only an optimisation: the engine path serves such a model
        return False
    for (_, _, module), (gate_up, down), forward in zip(modules, weights, forwards, strict=True):
        setattr(module, in_proj(module), nn.Parameter(gate_up, requires_grad=False))
        module.down_proj = nn.Parameter(down, requires_grad=False)
        module._zipmoe_resident = forward
    return True


def release_resident(model: nn.Module) -> None:
    """Undo serve_resident (at unload): the modules let go of the pool's memory and cannot run."""
    for _, _, module in experts_modules(model):
        if getattr(module, "_zipmoe_resident", None) is not None:
            for pname in (in_proj(module), "down_proj"):
                to_meta(module, pname)
            module._zipmoe_resident = None


def to_meta(module: nn.Module, name: str) -> None:
    """Replace the Parameter `name` of `module` by a meta placeholder of its shape and dtype (no memory)."""
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"), requires_grad=False))


_DECODING = threading.local()  # .models: owner ids of the models in generate()'s decode phase on a GPU, per thread


def _follow_decode_switch(model: nn.Module) -> None:
    """generate() decodes a "grouped_mm" model on a GPU with "batched_mm" (transformers'
    GenerationMixin._optimize_model_for_decode: faster for few tokens). It cannot see that our
    "zipmoe" model has grouped_mm as its reference, so this wrapper applies the same rule to it: the
    same kernels, hence the same bits, as plain generate(). The flag is per thread, because the
    server runs one request's prefill next to another's decode on one model (serve/shared_step.py),
    and per model, because another zipmoe model called during a decode step (a draft model, say)
    runs its own phase.
    Versions without the switch keep one reference throughout."""
    original = getattr(type(model), "_optimize_model_for_decode", None)
    if original is None:
        return

    model_ref = weakref.ref(model)  # no cycle through the model: it stays collectable by reference counting
    owner = id(model)

    @contextlib.contextmanager
    def optimize_model_for_decode(*args, **kwargs):
        m = model_ref()
        with original(m, *args, **kwargs):
            before = getattr(_DECODING, "models", frozenset())
            if _switches_for_decode(m):
                _DECODING.models = before | {owner}
            try:
                yield
            finally:
                _DECODING.models = before

    model._optimize_model_for_decode = optimize_model_for_decode


def _switches_for_decode(model: nn.Module) -> bool:
    """transformers' condition for the switch (a model on a non-CPU device)."""
    return model.device.type != "cpu"


def _decode_reference(reference: str) -> str:
    """The implementation generate() decodes with on a GPU, for a model whose reference is `reference`."""
    return "batched_mm" if reference == "grouped_mm" else reference


def install(model: nn.Module, source: ExpertSource, reference: str | None = None) -> list[int]:
    """Serve every fused experts module of `model` from `source`; returns the MoE layer indices.

    reference: "eager", "grouped_mm" or "batched_mm" — the transformers implementation the results are
    bit-exact to (default: the model's current one, i.e. what plain from_pretrained picked); generate()
    switches grouped_mm to batched_mm for decoding on a GPU, as it does for plain transformers. The experts'
    weight Parameters are replaced by meta placeholders of the same shape (they hold no memory), so
    move the model to its device before install, never after.
    """
    current = getattr(model.config, "_experts_implementation", None)
    if current == IMPLEMENTATION:  # re-install: keep the reference chosen the first time
        current = getattr(model, "_zipmoe_reference", None)
    reference = reference or current or "grouped_mm"
    if reference not in _FORWARDS:
        raise UnsupportedModelError(
            f"experts implementation {reference!r} has no zipmoe counterpart; "
            f"use one of {', '.join(REFERENCES)}"
        )
    modules = experts_modules(model)
    if not modules:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no fused experts module (gate_up_proj or up_proj, and down_proj, under "
            "@use_experts_implementation); per-expert nn.Linear layouts need a dedicated adapter"
        )
    routers = _next_routers(model, modules)
    for layer, name, module in modules:
        check_layout(name, module, reference)
        module._zipmoe_next = routers.get(layer)
        for pname in (in_proj(module), "down_proj"):
            to_meta(module, pname)
        module.intermediate_dim = module.down_proj.shape[2]
        module._zipmoe_source = source
        module._zipmoe_takes_tokens = takes_tokens(source)
        module._zipmoe_owner = id(model)
        module._zipmoe_layer = layer
        # (prefill, decode): generate()'s decode phase on a GPU may use another implementation
        module._zipmoe_forward = (_FORWARDS[reference], _FORWARDS[_decode_reference(reference)])
        module._zipmoe_resident = None  # serve_resident: the reference implementation itself, as a pair
    model._zipmoe_reference = reference
    model.set_experts_implementation(IMPLEMENTATION)
    _follow_decode_switch(model)
    return sorted(layer for layer, _, _ in modules)
