"""build_model_without_experts: a transformers model whose dense weights are real and whose routed
expert Parameters are meta placeholders (no memory), ready for compute.install(model, source).

Mirrors what from_pretrained does for the dense part: checkpoint key renamings (e.g. Mixtral's
block_sparse_moe -> mlp; models/names.py), each tensor cast to its Parameter's dtype (DeepSeek-V2 keeps
its router in float32), tied weights, and non-persistent buffers (rotary inv_freq) recomputed by
_init_weights. `load_hf_config` lives in names.py and is re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from zipmoe.errors import UnsupportedModelError, ZipMoEError
from zipmoe.models.base import ModuleAdapter
from zipmoe.models.compute import experts_modules, in_proj
from zipmoe.models.names import auto_class, load_hf_config, merged_dense_message, placements
from zipmoe.models.registry import get_adapter


def build_model_without_experts(
    config: str | Path | Mapping[str, Any] | transformers.PretrainedConfig,
    dense_state_dict: Mapping[str, torch.Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    experts_implementation: str | None = None,
) -> nn.Module:
    """Causal LM (or seq2seq LM, for encoder-decoder configs) with dense weights from `dense_state_dict`
    (checkpoint names) and meta experts.

    experts_implementation: the reference the zipmoe forward will be bit-exact to ("eager",
    "grouped_mm"; None = what from_pretrained picks by default). dtype None = config's dtype.
    """
    hf_config = load_hf_config(config)
    dtype = dtype or _config_dtype(hf_config)
    adapter = get_adapter(hf_config.model_type)
    auto = auto_class(hf_config)
    kwargs = {} if isinstance(adapter, ModuleAdapter) else {"experts_implementation": experts_implementation}
    with torch.device("meta"):
        model = auto.from_config(hf_config, dtype=dtype, **kwargs)
    if isinstance(adapter, ModuleAdapter):  # one nn.Module per expert
        expert_keys = {n.name for n in adapter.expert_names(hf_config.to_dict())}
    else:
        expert_keys = {f"{n}.{p}" for _, n, m in experts_modules(model) for p in (in_proj(m), "down_proj")}
    state = _renamed_dense(model, dense_state_dict, device)
    missing, _ = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    _materialize_non_persistent_buffers(model, device)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    still_meta = sorted(k for k, t in tensors if t.is_meta and k not in expert_keys)
    if still_meta:
        raise ZipMoEError(
            f"dense weights missing for {len(still_meta)} tensor(s), e.g. {still_meta[:3]}: the store's "
            f"dense part does not match this transformers version's {type(model).__name__}"
        )
    assert set(missing) >= expert_keys - set(state), "expert tensors must stay unloaded"
    if isinstance(config, str | Path) and (Path(config) / "generation_config.json").exists():
        model.generation_config = transformers.GenerationConfig.from_pretrained(str(config))
    return model.eval()


def _config_dtype(hf_config: Any) -> torch.dtype:
    dtype = getattr(hf_config, "dtype", None) or torch.bfloat16
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _renamed_dense(
    model: nn.Module, dense: Mapping[str, torch.Tensor], device: Any
) -> dict[str, torch.Tensor]:
    """Checkpoint names -> model names (as from_pretrained maps them), each cast to its Parameter's dtype."""
    meta_sd = model.state_dict()
    out = {}
    for key, place in placements(model, dense).items():
        if place.converted:
            raise UnsupportedModelError(merged_dense_message(model, key))
        if place.name is None:
            raise ZipMoEError(
                f"dense tensor {key!r} has no place in {type(model).__name__}: the store was converted from "
                "another model or transformers version"
            )
        tensor, target = dense[key], meta_sd[place.name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ZipMoEError(
                f"dense tensor {key!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(target.shape)}: the store does not match config.json"
            )
        out[place.name] = tensor.to(device=device, dtype=target.dtype)
    return out


def _materialize_non_persistent_buffers(model: nn.Module, device: Any) -> None:
    """Allocate meta non-persistent buffers on `device` and let the model's _init_weights fill them."""
    owners = {}
    for module_name, module in model.named_modules():
        for buf_name in list(module._non_persistent_buffers_set):
            buf = module._buffers.get(buf_name)
            if buf is not None and buf.is_meta:
                module._buffers[buf_name] = torch.empty_like(buf, device=device)
                owners[module_name] = module
    for name, module in owners.items():
        if any(True for _ in module.parameters(recurse=False)):
            raise ZipMoEError(f"cannot initialise buffers of {name!r}: the module also holds parameters")
        model._init_weights(module)
