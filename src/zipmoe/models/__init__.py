"""models: one adapter per HF model_type; plugs the engine into transformers.

Converter API: expert_tensor_plan(weight_names, config) -> ExpertPlan (see base.py's docstring).
Engine API: ExpertSource (base.py) and compute.install / build_model_without_experts.
"""

from zipmoe.models.base import (
    DOWN,
    GATE,
    PROJ_ORDER,
    UNGATED,
    UP,
    Adapter,
    ExpertName,
    ExpertPlan,
    ExpertSource,
    FusedName,
    ProjSource,
)
from zipmoe.models.plan import expert_tensor_plan
from zipmoe.models.registry import ADAPTERS, REMAP, get_adapter, supported_model_types

__all__ = [
    "ADAPTERS",
    "DOWN",
    "GATE",
    "PROJ_ORDER",
    "REMAP",
    "UNGATED",
    "UP",
    "Adapter",
    "ExpertName",
    "ExpertPlan",
    "ExpertSource",
    "FusedName",
    "ProjSource",
    "expert_tensor_plan",
    "get_adapter",
    "supported_model_types",
]
