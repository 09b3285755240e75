"""Capacity planning: rank curves + costs + a byte budget ──▶ PoolPlan (ranks per pool, per layer).

Arrow: RankSnapshot (stats.py) + ExpertGeometry + CostModel (cost_model.py) + W + budget ──plan()──▶
PoolPlan ──▶ ExpertCache capacities + PlannedAdmission (admission.py). Load time, then a background
planning thread when the statistics drift (replan() keeps the pools' totals, so the cache's slabs
stay as they are and generation never waits). Pure numerics.

Rank order of the pools: F gets the hottest ranks, then C, then S, then E; the rest miss. Why: a hit
in F saves everything a C hit saves plus the decode; C saves both reads, S the SM read, E only the
(smaller) exponent read. With savings ordered F ≥ C ≥ S ≥ E per hit and p_r descending, the
rearrangement inequality says this order maximises the expected saving for any fixed pool sizes, so
the search only has to choose the sizes.

Search: (1) one split (n_F, n_C, n_S, n_E) for every layer, on the layers' mean curve: a coarse grid
over (n_F, n_C, n_S) with n_E filling the bytes left (E entries only ever help), then a descent over
±d moves with d halving to 1; (2) per-layer refinement at fixed pool totals: move one entry of a pool
from the layer where it gains least to the layer where it gains most while that lowers the sum.

# L=MoE layers E=experts per layer P=pools W=decode workers; sizes in bytes, times in s
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from zipmoe.errors import ZipMoEError
from zipmoe.planner.makespan import POOLS, ExpertGeometry, LayerModel, state_tasks
from zipmoe.planner.stats import RankSnapshot, rank_drift
from zipmoe.scheduler.tasks import CostModel
from zipmoe.types import State

_TIE = 1e-9  # relative difference below which two expectations count as equal
SCHEDULE_MAX_PER_CALL = 8  # mode "auto": price each hit combination with the real scheduler up to this many experts
Sizes = tuple[int, int, int, int]  # ranks given to F, C, S, E (in rank order) in one layer


@dataclass(frozen=True, slots=True)
class PoolPlan:
    """Where each rank of each layer lives, and what the layout is predicted to cost."""

    layers: tuple[int, ...]  # MoE layer ids
    sizes: tuple[Sizes, ...]  # per layer: ranks [0, n_F) in F, the next n_C in C, then S, then E
    num_experts: int  # experts per layer (ranks beyond the pools miss)
    entry_bytes: tuple[int, int, int, int]  # bytes of one F, C, S, E entry the plan was sized with
    predicted_s: float  # expected sum over layers of the layer makespan (s per model step)
    layer_s: tuple[float, ...]  # expected makespan per layer, s
    all_miss_s: float  # the same expectation with no pools at all (reference), s
    snapshot: RankSnapshot  # the rank curves the plan was made for (drift reference)
    _edges: dict[int, tuple[int, int, int, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        edges = {layer: tuple(itertools.accumulate(s)) for layer, s in zip(self.layers, self.sizes, strict=True)}
        object.__setattr__(self, "_edges", edges)

    @property
    def capacities(self) -> dict[State, int]:
        """Entries per pool summed over layers: what ExpertCache(capacities=...) takes."""
        return {p: sum(s[i] for s in self.sizes) for i, p in enumerate(POOLS)}

    @property
    def pool_bytes(self) -> int:
        """Bytes the pools take in the budget."""
        return sum(n * b for n, b in zip(self.capacities.values(), self.entry_bytes, strict=True))

    def ranges(self, layer: int) -> dict[State, tuple[int, int]]:
        """Rank range [lo, hi) of each pool in one layer."""
        edges = (0, *self._edges[layer])
        return {p: (edges[i], edges[i + 1]) for i, p in enumerate(POOLS)}

    def pool_of(self, layer: int, rank: int) -> State | None:
        """The pool a rank belongs to in a layer; None = miss range (or a layer the plan does not know)."""
        edges = self._edges.get(layer)
        if edges is None:
            return None
        for p, hi in zip(POOLS, edges, strict=True):
            if rank < hi:
                return p
        return None

    def drift(self, snapshot: RankSnapshot) -> float:
        """How far current curves are from the planned ones (stats.rank_drift)."""
        return rank_drift(self.snapshot, snapshot)

    def describe(self) -> str:
        """One line for the log."""
        cap = ", ".join(f"{p.name} {n}" for p, n in self.capacities.items())
        return (f"pool plan: {cap} entries ({self.pool_bytes / 2**30:.2f} GiB); expected "
                f"{self.predicted_s * 1e3:.2f} ms/step of expert loading+compute vs {self.all_miss_s * 1e3:.2f} "
                "with no cache")


def needs_replan(plan: PoolPlan, snapshot: RankSnapshot, threshold: float = 0.1) -> bool:
    """True when the curves drifted past `threshold` (total variation, 0..1) since the plan."""
    return plan.drift(snapshot) > threshold


@dataclass
class _Objective:
    """Expected makespans of layers under a LayerModel; curve ids key its PMF memo."""

    model: LayerModel
    curves: np.ndarray  # [L+1, E]: the layers' curves, then their mean (row L)
    memo: dict[tuple[int, tuple[int, ...]], float] = field(default_factory=dict)

    def layer(self, row: int, sizes: Sequence[int]) -> float:
        key = (row, tuple(sizes))
        if key not in self.memo:
            self.memo[key] = self.model.expected(row, self.curves[row], sizes)
        return self.memo[key]


def plan(
    snapshot: RankSnapshot, geom: ExpertGeometry, costs: CostModel, workers: int, budget_bytes: int, *,
    per_call: int | None = None, mode: str = "auto", grid: int = 8, refine: bool = True, late_merge: bool = False,
) -> PoolPlan:
    """The pool layout with the least expected layer makespan that fits `budget_bytes` of expert pools.

    per_call: experts needed per layer call when it is fixed (batch 1: top_k) — conditions the hit
    distribution on it; None for batches (the number of distinct experts varies). mode: 'bound',
    'schedule' (makespan.py) or 'auto': schedule when per_call is fixed and at most SCHEDULE_MAX_PER_CALL
    (few hit combinations, each priced by the real scheduler), else bound. grid: coarse grid points per
    axis of the first phase. late_merge: price loads as load(late_merge=True) runs them (makespan.state_tasks).
    """
    if budget_bytes < 0:
        raise ZipMoEError(f"budget_bytes must be >= 0, got {budget_bytes}")
    obj = _objective(snapshot, geom, costs, workers, per_call, mode, late_merge)
    n_layers, n = len(snapshot.layers), snapshot.curves.shape[1]
    split = _best_split(obj, n_layers, n, geom.entry_bytes, budget_bytes // max(1, n_layers), grid)
    sizes = [split] * n_layers
    if refine and n_layers > 1:
        sizes = _refine(obj, sizes, n)
    return _finish(obj, snapshot, sizes, geom)


def replan(
    old: PoolPlan, snapshot: RankSnapshot, geom: ExpertGeometry, costs: CostModel, workers: int, *,
    per_call: int | None = None, mode: str = "auto", late_merge: bool = False,
) -> PoolPlan:
    """A plan for new curves with the same pool totals as `old` (the cache needs no resizing): only
    the per-layer rank ranges move. Run it on a background thread and swap the admission's plan."""
    if snapshot.layers != old.layers or snapshot.curves.shape[1] != old.num_experts:
        raise ZipMoEError("replan needs statistics for the same layers and expert count as the old plan")
    obj = _objective(snapshot, geom, costs, workers, per_call, mode, late_merge)
    return _finish(obj, snapshot, _refine(obj, list(old.sizes), old.num_experts), geom)


def layout_cost(
    snapshot: RankSnapshot, geom: ExpertGeometry, costs: CostModel, workers: int, sizes: Sizes, *,
    per_call: int | None = None, mode: str = "auto", late_merge: bool = False,
) -> float:
    """Expected s per model step of one layout (the same split in every layer), under plan()'s model:
    what a fixed split such as the default all-C one costs next to a plan."""
    if min(sizes) < 0 or sum(sizes) > snapshot.curves.shape[1]:
        raise ZipMoEError(f"a layout gives 0..{snapshot.curves.shape[1]} ranks to the pools, got {sizes}")
    obj = _objective(snapshot, geom, costs, workers, per_call, mode, late_merge)
    return sum(obj.layer(i, sizes) for i in range(len(snapshot.layers)))


def _objective(snapshot: RankSnapshot, geom: ExpertGeometry, costs: CostModel, workers: int,
               per_call: int | None, mode: str, late_merge: bool = False) -> _Objective:
    if not snapshot.layers:
        raise ZipMoEError("cannot plan without MoE layers")
    empty = [layer for layer, c in zip(snapshot.layers, snapshot.curves, strict=True) if not c.sum() > 0]
    if empty:
        raise ZipMoEError(
            f"no routing statistics for MoE layers {empty[:8]}: observe some steps first, or seed "
            "RoutingStats with a prior (profile_io.profile_curves + stats.seed_from_curves)")
    curves = np.vstack([snapshot.curves, snapshot.curves.mean(axis=0, keepdims=True)])
    if mode == "auto":
        mode = "schedule" if per_call is not None and per_call <= SCHEDULE_MAX_PER_CALL else "bound"
    tasks = state_tasks(geom, costs, late_merge=late_merge)
    return _Objective(LayerModel(tasks, workers, per_call=per_call, mode=mode), curves)


def _finish(obj: _Objective, snapshot: RankSnapshot, sizes: list[Sizes], geom: ExpertGeometry) -> PoolPlan:
    layer_s = tuple(obj.layer(i, s) for i, s in enumerate(sizes))
    miss = sum(obj.layer(i, (0, 0, 0, 0)) for i in range(len(sizes)))
    return PoolPlan(snapshot.layers, tuple(tuple(s) for s in sizes), snapshot.curves.shape[1],  # type: ignore[misc]
                    geom.entry_bytes, sum(layer_s), layer_s, miss, snapshot)


def _fill(f: int, c: int, s: int, n: int, per: Sequence[int], budget: int) -> Sizes | None:
    """(f, c, s, e) with e as large as bytes and ranks allow; None if (f, c, s) alone does not fit."""
    left = budget - f * per[0] - c * per[1] - s * per[2]
    if min(f, c, s) < 0 or f + c + s > n or left < 0:
        return None
    return (f, c, s, min(n - f - c - s, left // per[3]))


def _axis(hi: int, points: int) -> list[int]:
    return sorted({round(float(x)) for x in np.linspace(0, hi, max(2, points + 1))}) if hi > 0 else [0]


def _best_split(obj: _Objective, n_layers: int, n: int, per: Sequence[int], budget: int, grid: int) -> Sizes:
    """Phase 1 on the mean curve: coarse grid, then descent with halving steps."""
    mean = len(obj.curves) - 1
    memo: dict[Sizes, float] = {}

    def cost(sz: Sizes | None) -> float:
        if sz is None:
            return math.inf
        if sz not in memo:
            memo[sz] = obj.layer(mean, sz)
        return memo[sz]

    def better(a: Sizes | None, b: Sizes | None) -> bool:
        """Lower cost; within rounding, the hotter layout (more F, then C, then S) — pruned tails tie."""
        ca, cb = cost(a), cost(b)
        if ca < cb * (1 - _TIE) or b is None:
            return a is not None
        return a is not None and ca <= cb * (1 + _TIE) and tuple(-x for x in a[:3]) < tuple(-x for x in b[:3])

    cap = [min(n, budget // b) for b in per[:3]]
    best: Sizes | None = None
    for f, c, s in itertools.product(_axis(cap[0], grid), _axis(cap[1], grid), _axis(cap[2], grid)):
        if better(sz := _fill(f, c, s, n, per, budget), best):
            best = sz
    assert best is not None, "(0, 0, 0) always fits"
    step = max(1, max(cap) // max(1, grid))
    while True:
        moved = False
        for a, b, c in itertools.product((-step, 0, step), repeat=3):
            if better(sz := _fill(best[0] + a, best[1] + b, best[2] + c, n, per, budget), best):
                best, moved = sz, True
        if not moved:
            if step == 1:
                return best
            step //= 2


def _refine(obj: _Objective, sizes: list[Sizes], n: int, max_moves: int | None = None) -> list[Sizes]:
    """Phase 2: per pool, move single entries between layers while the summed expectation drops."""
    sizes = [tuple(s) for s in sizes]
    max_moves = 8 * len(sizes) * len(POOLS) if max_moves is None else max_moves
    base = [obj.layer(i, s) for i, s in enumerate(sizes)]

    def shifted(i: int, p: int, d: int) -> tuple[int, ...] | None:
        s = list(sizes[i])
        s[p] += d
        return tuple(s) if s[p] >= 0 and sum(s) <= n else None

    for _ in range(max_moves):
        best_gain, best_move = 1e-12 * max(sum(base), 1e-30), None
        for p in range(len(POOLS)):
            gain = [base[i] - obj.layer(i, s) if (s := shifted(i, p, +1)) else -math.inf for i in range(len(sizes))]
            loss = [obj.layer(i, s) - base[i] if (s := shifted(i, p, -1)) else math.inf for i in range(len(sizes))]
            for to, frm in itertools.product(np.argsort(gain)[::-1][:2], np.argsort(loss)[:2]):
                if to != frm and gain[to] - loss[frm] > best_gain:
                    best_gain, best_move = gain[to] - loss[frm], (p, int(frm), int(to))
        if best_move is None:
            break
        p, frm, to = best_move
        sizes[frm], sizes[to] = shifted(frm, p, -1), shifted(to, p, +1)  # type: ignore[assignment]
        base[frm], base[to] = obj.layer(frm, sizes[frm]), obj.layer(to, sizes[to])
    return sizes  # type: ignore[return-value]
