"""model_type -> adapter module, imported lazily (one file per HF model_type, named like config.json)."""

from __future__ import annotations

import importlib

from zipmoe.errors import UnsupportedModelError
from zipmoe.models.base import Adapter

ADAPTERS: dict[str, str] = {
    "qwen2_moe": "zipmoe.models.qwen2_moe",
    "qwen3_moe": "zipmoe.models.qwen3_moe",
    "mixtral": "zipmoe.models.mixtral",
    "olmoe": "zipmoe.models.olmoe",
    "deepseek_v2": "zipmoe.models.deepseek_v2",
    "switch_transformers": "zipmoe.models.switch_transformers",  # per-expert nn.Linear (models/per_expert.py)
}
# Aliases: model_types whose checkpoints use an adapter's layout unchanged.
REMAP: dict[str, str] = {}
GENERIC = "zipmoe.models.generic"


def supported_model_types() -> list[str]:
    """Every model_type with a dedicated adapter or alias, sorted."""
    return sorted({*ADAPTERS, *REMAP})


def unsupported_message(model_type: str | None, why: str) -> str:
    """One message format for every 'cannot handle this model' error."""
    return (
        f"model_type {model_type!r}: {why}. Supported model_types: {', '.join(supported_model_types())}; "
        "other HF MoE checkpoints work through the generic rule when their routed experts are named "
        "'...layers.{l}.<path>.experts.{j}.(gate_proj|up_proj|down_proj).weight' or fused "
        "'...experts.gate_up_proj' (or '...experts.up_proj', or GraniteMoe's 'block_sparse_moe.input_linear') / "
        "'...experts.down_proj'."
    )


def get_adapter(model_type: str | None, allow_generic: bool = True) -> Adapter:
    """The adapter for model_type; the generic one for unknown types unless allow_generic is False."""
    module = ADAPTERS.get(REMAP.get(model_type or "", model_type or ""))
    if module is None:
        if not allow_generic:
            raise UnsupportedModelError(unsupported_message(model_type, "no dedicated adapter"))
        module = GENERIC
    return importlib.import_module(module).ADAPTER
