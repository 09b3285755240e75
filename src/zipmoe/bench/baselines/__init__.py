"""The systems `zipmoe bench e2e` compares, one module each, behind one interface (base.HFSystem).

    system = make_system("zipmoe")            # zipmoe | uncompressed | accelerate | transformers
    system.unavailable()                      # reason it cannot run here, or None  (llama.cpp unbuilt, dfloat11)
    system.prepare(setup, budget)             # load under the budget, hook the calibrated routing
    record = system.run(prompts, new_tokens)  # one left-padded batch -> metrics record
    system.close()
"""

from __future__ import annotations

import importlib

from zipmoe.bench.baselines.base import Budget, HFSystem, Setup, hook_routers, routers
from zipmoe.errors import ZipMoEError

# --systems name -> (module, class); imported lazily (accelerate and friends are heavy)
SYSTEMS: dict[str, tuple[str, str]] = {
    "zipmoe": ("zipmoe.bench.baselines.zipmoe_engine", "ZipMoESystem"),
    "zipmoe-fused": ("zipmoe.bench.baselines.zipmoe_engine", "ZipMoEFusedSystem"),
    "uncompressed": ("zipmoe.bench.baselines.uncompressed", "UncompressedSystem"),
    "accelerate": ("zipmoe.bench.baselines.accelerate_offload", "AccelerateSystem"),
    "transformers": ("zipmoe.bench.baselines.transformers_ref", "TransformersSystem"),
    "llama.cpp": ("zipmoe.bench.baselines.llama_cpp", "LlamaCppSystem"),
    "dfloat11": ("zipmoe.bench.baselines.dfloat11", "DFloat11System"),
}

# not compared, never in --systems: what `bench e2e --warm-process attention` replays the workload on
WARM_UP_SYSTEMS: dict[str, tuple[str, str]] = {
    "attention-warmup": ("zipmoe.bench.baselines.transformers_ref", "AttentionWarmUp"),
}


def make_system(name: str) -> HFSystem:
    """A fresh system object by its --systems name (or a warm-up system's)."""
    found = SYSTEMS.get(name) or WARM_UP_SYSTEMS.get(name)
    if found is None:
        raise ZipMoEError(f"unknown system {name!r}: choose from {', '.join(SYSTEMS)}")
    module, cls = found
    return getattr(importlib.import_module(module), cls)()


__all__ = ["SYSTEMS", "Budget", "HFSystem", "Setup", "hook_routers", "make_system", "routers"]
