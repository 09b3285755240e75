"""System "transformers": plain transformers with every weight on the compute device (the ceiling).

bench stage. from_pretrained(dtype=bfloat16) moved to the device, transformers' default experts
implementation (grouped_mm on CUDA), no budget: it runs once, at budget "all". Sizes in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers

from zipmoe.bench.baselines.base import Budget, HFSystem, Setup
from zipmoe.bench.metrics import StepProbe


@dataclass
class TransformersSystem(HFSystem):
    name: str = "transformers"
    label: str = "transformers (all on device)"
    page_cache: str = "n/a (every weight resident)"

    def budgets(self, budgets: list[Budget]) -> list[Budget]:
        return [Budget(None, None)]

    def _load(self, setup: Setup, budget: Budget) -> torch.nn.Module:
        kwargs: dict = {"dtype": torch.bfloat16}
        if setup.experts_implementation:
            kwargs["experts_implementation"] = setup.experts_implementation
        model = transformers.AutoModelForCausalLM.from_pretrained(setup.hf_dir, **kwargs).to(setup.device)
        self.info = {"experts_implementation": getattr(model.config, "_experts_implementation", None)}
        return model


@dataclass
class AttentionWarmUp(TransformersSystem):
    """Not a compared system: plain transformers on a one-decoder-layer clone of the model's config, random
    weights, on the device. `bench e2e --warm-process attention` replays the workload on it before the
    measured runs. CUDA's attention graphs are built per (batch, query length, key length) of each
    attention call, whatever the layer or the weights, so one layer meets every shape the full model will,
    at a fraction of a replay through an offloading system (~14 ms per step on the device against ~130 ms;
    the 8 × 64-token batch-1 replay of zipmoe took 118 s). Routing: the clone's own routers."""

    name: str = "attention-warmup"
    label: str = "one-layer clone (warm-up only)"

    def _load(self, setup: Setup, budget: Budget) -> torch.nn.Module:
        config = one_layer_config(transformers.AutoConfig.from_pretrained(setup.hf_dir))
        kwargs: dict = {"dtype": torch.bfloat16}
        if setup.experts_implementation:
            kwargs["experts_implementation"] = setup.experts_implementation
        with torch.device(setup.device):
            model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
        self.info = {"layers": config.num_hidden_layers}
        return model.eval()

    def prepare(self, setup: Setup, budget: Budget) -> None:
        self.setup = setup
        self.model = self._load(setup, budget)
        self.routing = None
        self.probe = StepProbe(self.model, self._counters, cuda=setup.device.startswith("cuda"))


def one_layer_config(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    """The same config cut to its first decoder layer (per-layer lists cut with it)."""
    config.num_hidden_layers = 1
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:1]
    if isinstance(getattr(config, "mlp_only_layers", None), list):
        config.mlp_only_layers = [i for i in config.mlp_only_layers if i < 1]
    return config
