"""Scheduler: a layer's needed experts → Plan (pure, schedule.schedule) → Executor (threads, executor.py).

tasks.py holds the plain data (ExpertTask, CostModel, Plan, PlanTimings); model.py the resource model
every function is judged in; sim.py runs plans in that model; exact.py is the exact oracle for tests.
"""

from zipmoe.errors import ExpertTaskError
from zipmoe.scheduler.executor import Executor, LayerOps, RunHandle
from zipmoe.scheduler.model import lower_bound
from zipmoe.scheduler.sim import Order, simulate
from zipmoe.scheduler.tasks import (
    MERGE,
    CostModel,
    DecodeStep,
    ExpertTask,
    ExpertTimes,
    IoStep,
    Plan,
    Plane,
    PlanTimings,
)

__all__ = [
    "MERGE", "CostModel", "DecodeStep", "Executor", "ExpertTask", "ExpertTaskError", "ExpertTimes", "IoStep",
    "LayerOps", "Order", "Plan", "PlanTimings", "Plane", "RunHandle", "lower_bound", "simulate",
]
