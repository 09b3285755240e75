"""System "transformers": plain transformers with every weight on the compute device (the ceiling).

bench stage. from_pretrained(dtype=bfloat16) moved to the device, transformers' default experts
implementation (grouped_mm on CUDA), no budget: it runs once, at budget "all". Sizes in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from zipmoe.bench.baselines.base import Budget, HFSystem, Setup


@dataclass
class TransformersSystem(HFSystem):
    name: str = "transformers"
    label: str = "transformers (all on device)"
    page_cache: str = "n/a (every weight resident)"

    def budgets(self, budgets: list[Budget]) -> list[Budget]:
        return [Budget(None, None)]

    def _load(self, setup: Setup, budget: Budget) -> torch.nn.Module:
        model = transformers.AutoModelForCausalLM.from_pretrained(setup.hf_dir, **_kwargs(setup)).to(setup.device)
        self.info = {"experts_implementation": getattr(model.config, "_experts_implementation", None)}
        return model


def _kwargs(setup: Setup) -> dict:
    kwargs: dict = {"dtype": torch.bfloat16}
    if setup.experts_implementation:
        kwargs["experts_implementation"] = setup.experts_implementation
    return kwargs


@dataclass
class AttentionWarmUp(TransformersSystem):
    """Not a compared system: plain transformers on a clone of the model's config cut to one decoder layer
    per distinct layer type, random weights, on the device. `bench e2e --warm-process attention` replays the
    workload on it before the measured runs. CUDA's attention graphs are built per (batch, query length, key
    length) of each attention call, whatever the weights, so the clone meets every shape the full model
    will (one layer of each type: a sliding-window layer caps its key length, a full one does not), at a
    fraction of a replay through an offloading system (~14 ms per step on the device against ~130 ms; the
    8 × 64-token batch-1 replay of zipmoe took 118 s). Routing: the clone's own routers."""

    name: str = "attention-warmup"
    label: str = "one layer per layer type (warm-up only)"

    def _load(self, setup: Setup, budget: Budget) -> torch.nn.Module:
        config = one_layer_per_type(transformers.AutoConfig.from_pretrained(setup.hf_dir))
        with torch.device(setup.device):
            model = transformers.AutoModelForCausalLM.from_config(config, **_kwargs(setup))
        generation = Path(setup.hf_dir) / "generation_config.json"
        if generation.exists():  # as models/build.py: its cache settings decide the key lengths
            model.generation_config = transformers.GenerationConfig.from_pretrained(setup.hf_dir)
        self.info = {"layers": config.num_hidden_layers}
        return model.eval()

    def _routing(self, setup: Setup) -> None:
        return None


def one_layer_per_type(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    """The same config cut to the first decoder layer of each distinct `layer_types` entry (the first layer
    when it has none); `mlp_only_layers` follows the kept layers."""
    types = getattr(config, "layer_types", None)
    kept = [0]
    if isinstance(types, list) and types:
        kept = [types.index(t) for t in dict.fromkeys(types)]
        config.layer_types = [types[i] for i in kept]
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "mlp_only_layers", None), list):
        config.mlp_only_layers = [new for new, old in enumerate(kept) if old in config.mlp_only_layers]
    return config
