"""System "transformers": plain transformers with every weight on the compute device (the ceiling).

bench stage. from_pretrained(dtype=bfloat16) moved to the device, transformers' default experts
implementation (grouped_mm on CUDA), no budget: it runs once, at budget "all". Sizes in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        kwargs: dict = {"dtype": torch.bfloat16}
        if setup.experts_implementation:
            kwargs["experts_implementation"] = setup.experts_implementation
        model = transformers.AutoModelForCausalLM.from_pretrained(setup.hf_dir, **kwargs).to(setup.device)
        self.info = {"experts_implementation": getattr(model.config, "_experts_implementation", None)}
        return model
