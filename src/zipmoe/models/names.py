"""models/names.py: checkpoint tensor names against the model transformers builds, as from_pretrained maps them.

Used twice: by the converter, before anything is written (which tensors from_pretrained would drop, and
whether the engine could load the rest), and by load(), on the store's dense part. One rule for both:
transformers' own `rename_source_key` (its renamings, then at most one converter), falling back to the
key itself when only that names a model tensor (as its loader does: deepseek_v4's `.norm.` renaming
would otherwise move model.norm).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, rename_source_key

log = logging.getLogger("zipmoe")


def load_hf_config(config: str | Path | Mapping[str, Any] | transformers.PretrainedConfig):
    """A transformers config from a directory, a config.json dict or a config object."""
    if isinstance(config, transformers.PretrainedConfig):
        return copy.deepcopy(config)  # never share (and mutate) the caller's config
    if isinstance(config, str | Path):
        return transformers.AutoConfig.from_pretrained(str(config))
    d = dict(config)
    return transformers.AutoConfig.for_model(d.pop("model_type"), **d)


def auto_class(hf_config: Any) -> type:
    """What from_pretrained users reach for: a seq2seq LM for encoder-decoder configs, else a causal LM."""
    return transformers.AutoModelForSeq2SeqLM if hf_config.is_encoder_decoder else transformers.AutoModelForCausalLM


def meta_model(config: str | Path | Mapping[str, Any]) -> nn.Module | None:
    """The model transformers builds from `config`, on the meta device (no memory; ~1 s for a
    DeepSeek-V3-sized config); None (warned) when this transformers cannot build it."""
    try:
        hf_config = load_hf_config(config)
        with torch.device("meta"):
            return auto_class(hf_config).from_config(hf_config)
    except (ValueError, KeyError, TypeError, OSError) as exc:  # e.g. a model_type this transformers lacks
        log.warning("cannot build the model to check the checkpoint's tensor names (%s); load() will", exc)
        return None


@dataclass(frozen=True)
class Placement:
    """Where from_pretrained puts one checkpoint tensor."""

    name: str | None  # the model tensor it lands in; None: the model has no place for it (dropped)
    converted: bool  # it goes through a WeightConverter (merged with or split from other tensors)


def placements(model: nn.Module, keys: Iterable[str]) -> dict[str, Placement]:
    """Checkpoint key -> where from_pretrained puts it in `model` (see the module docstring)."""
    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if not isinstance(t, WeightConverter)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    meta_sd = model.state_dict()
    out = {}
    for key in sorted(keys):
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_sd)
        if name not in meta_sd and key in meta_sd:
            name, pattern = key, None
        out[key] = Placement(name if name in meta_sd else None, pattern is not None)
    return out


def merged_dense_message(model: nn.Module, key: str) -> str:
    """Why a model whose dense tensors transformers merges or splits on load is refused."""
    return (f"{type(model).__name__}: transformers merges or splits the dense tensor {key!r} with others on load "
            "(a WeightConverter in its conversion_mapping.py); zipmoe loads dense tensors as they are stored, so "
            "this model is not supported yet")
