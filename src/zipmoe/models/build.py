"""build_model_without_experts: a transformers model whose dense weights are real and whose routed
expert Parameters are meta placeholders (no memory), ready for compute.install(model, source).

Mirrors what from_pretrained does for the dense part: checkpoint key renamings (e.g. Mixtral's
block_sparse_moe -> mlp), each tensor cast to its Parameter's dtype (DeepSeek-V2 keeps its router in
float32), tied weights, and non-persistent buffers (rotary inv_freq) recomputed by _init_weights.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, rename_source_key

from zipmoe.errors import UnsupportedModelError, ZipMoEError
from zipmoe.models.base import ModuleAdapter
from zipmoe.models.compute import experts_modules, in_proj
from zipmoe.models.per_expert import expert_parameter_names
from zipmoe.models.registry import get_adapter

log = logging.getLogger("zipmoe")


def load_hf_config(config: str | Path | Mapping[str, Any] | transformers.PretrainedConfig):
    """A transformers config from a directory, a config.json dict or a config object."""
    if isinstance(config, transformers.PretrainedConfig):
        return copy.deepcopy(config)  # never share (and mutate) the caller's config
    if isinstance(config, str | Path):
        return transformers.AutoConfig.from_pretrained(str(config))
    d = dict(config)
    return transformers.AutoConfig.for_model(d.pop("model_type"), **d)


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
    auto = _auto_class(hf_config)
    kwargs = {} if isinstance(adapter, ModuleAdapter) else {"experts_implementation": experts_implementation}
    with torch.device("meta"):
        model = auto.from_config(hf_config, dtype=dtype, **kwargs)
    if isinstance(adapter, ModuleAdapter):  # one nn.Module per expert
        expert_keys = expert_parameter_names(hf_config.to_dict(), adapter)
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
    """Checkpoint names -> model names (transformers' renamings), each cast to its Parameter's dtype."""
    meta_sd = model.state_dict()
    names = dense_model_names(model, dense)
    out = {}
    for key, tensor in dense.items():
        target = meta_sd[names[key]]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ZipMoEError(
                f"dense tensor {key!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(target.shape)}: the store does not match config.json"
            )
        out[names[key]] = tensor.to(device=device, dtype=target.dtype)
    return out


def dense_model_names(model: nn.Module, keys: Iterable[str]) -> dict[str, str]:
    """Checkpoint name -> the model's name for each dense tensor, by transformers' renamings; raises for a
    tensor the model has no place for, or one transformers merges or splits with others on load."""
    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if not isinstance(t, WeightConverter)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    meta_sd = model.state_dict()
    out = {}
    for key in keys:
        # a key that already names a model tensor stays (transformers' loader keeps deepseek_v4's model.norm,
        # which its `.norm.` -> `.kv_norm.` renaming would otherwise move)
        name = key if key in meta_sd else rename_source_key(key, renamings, [], model.base_model_prefix, meta_sd)[0]
        if name not in meta_sd and any(c.rename_source_key(name)[1] is not None for c in converters):
            raise UnsupportedModelError(
                f"{type(model).__name__}: transformers merges or splits the dense tensor {key!r} with others on "
                "load (a WeightConverter in its conversion_mapping.py); zipmoe loads dense tensors by renaming "
                "only, so this model is not supported yet"
            )
        if name not in meta_sd:
            raise ZipMoEError(
                f"dense tensor {key!r} (as {name!r}) has no place in {type(model).__name__}: the store was "
                "converted from another model or transformers version"
            )
        out[key] = name
    return out


def meta_model(config: str | Path | Mapping[str, Any]) -> nn.Module | None:
    """The model transformers builds from `config`, on the meta device (no memory), to check names against;
    None (warned) when this transformers cannot build it."""
    try:
        hf_config = load_hf_config(config)
        with torch.device("meta"):
            return _auto_class(hf_config).from_config(hf_config)
    except (ValueError, KeyError, TypeError, OSError) as exc:  # e.g. a model_type this transformers lacks
        log.warning("cannot build the model to check the checkpoint's tensor names (%s); load() will", exc)
        return None


_LAYER_PREFIX = re.compile(r"^(.*?\blayers\.\d+)\.")


def ignored_on_load(model: nn.Module, names: Iterable[str]) -> set[str]:
    """Checkpoint tensors from_pretrained drops: those its `_keys_to_ignore_on_load_unexpected` patterns
    name (multi-token-prediction layers: Qwen3-Next's mtp.*, DeepSeek-V3's layer 61, GLM-4.5's extra
    layer) when the model has no place for them (GLM-4.5 with 92 layers keeps its layer 46)."""
    patterns = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()
    if not patterns:
        return set()
    regex = re.compile("|".join(f"({p})" for p in patterns))
    modules = dict(model.named_modules())
    meta_sd = model.state_dict()

    def has_place(name: str) -> bool:
        layer = _LAYER_PREFIX.match(name)
        return name in meta_sd or (layer is not None and layer.group(1) in modules)

    return {n for n in names if regex.search(n) and not has_place(n)}


def _auto_class(hf_config: Any) -> type:
    """What from_pretrained users reach for: a seq2seq LM for encoder-decoder configs, else a causal LM."""
    return transformers.AutoModelForSeq2SeqLM if hf_config.is_encoder_decoder else transformers.AutoModelForCausalLM


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
