"""planner/: routing statistics + profiled costs + a memory budget → pool sizes and rank ranges.

    stats.py            RoutingStats: per-layer decayed activation counts, ranks, rank curves p_r, drift
    profile_io.py       statistics file next to the store (versioned, checksummed); priors from real profiles
    poisson_binomial.py exact PMFs of hits per pool (convolution DP) and their joint distribution
    makespan.py         expected layer makespan of a layout under the scheduler's model
    capacity.py         plan() / replan(): the layout search → PoolPlan
    cost_model.py       profile_machine(): measured disk/decode/merge rates → scheduler CostModel
    admission.py        PlannedAdmission: the cache's admission policy following a PoolPlan

Pure numerics and file I/O: never imports torch, the engine or the models (admission.py reaches the
cache's Decision type only when a PlannedAdmission is built, i.e. inside the engine).
"""

from zipmoe.planner.capacity import PoolPlan, needs_replan, plan, replan
from zipmoe.planner.makespan import ExpertGeometry
from zipmoe.planner.stats import RankSnapshot, RoutingStats, rank_drift

__all__ = ["ExpertGeometry", "PoolPlan", "RankSnapshot", "RoutingStats", "needs_replan", "plan", "rank_drift",
           "replan"]
