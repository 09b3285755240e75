"""Capacity planning: the makespan model against the scheduler, limit cases, fit, re-planning."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from zipmoe.errors import ZipMoEError
from zipmoe.planner.capacity import PoolPlan, layout_cost, needs_replan, plan, replan
from zipmoe.planner.makespan import (
    HIT_STATES,
    ExpertGeometry,
    LayerModel,
    makespan_bound,
    scheduled_makespan,
    state_tasks,
)
from zipmoe.planner.poisson_binomial import split_bounds
from zipmoe.planner.profile_io import profile_curves
from zipmoe.planner.stats import RankSnapshot
from zipmoe.scheduler.model import lower_bound
from zipmoe.scheduler.tasks import CostModel, ExpertTask
from zipmoe.types import ExpertKey, State

E, LAYERS, NUMEL = 60, 4, 3 * 2048 * 1408  # Qwen1.5-MoE-shaped experts, a few layers (fast tests)
GEOM = ExpertGeometry.of(NUMEL, NUMEL, int(0.34 * NUMEL), k=4)
COSTS = CostModel(disk_bytes_per_s=1.5e9, disk_latency_s=1e-4, decode_bytes_per_s=1e9, merge_bytes_per_s=6e9,
                  compute_s=5e-4)
W = 7
F_BYTES = GEOM.entry_bytes[0]


def snapshot(layers: int = LAYERS, model: str = "qwen1.5-moe-a2.7b") -> RankSnapshot:
    return RankSnapshot(tuple(range(layers)), profile_curves(model, layers, E), (100.0,) * layers)


def budget(fraction: float, layers: int = LAYERS) -> int:
    """A share of the bytes every expert takes in F."""
    return int(fraction * layers * E * F_BYTES)


def layer_of(counts, tasks) -> list[ExpertTask]:
    out = []
    for st, n in zip(HIT_STATES, counts, strict=True):
        for _ in range(n):
            t = tasks[st]
            out.append(dataclasses.replace(t, key=ExpertKey(-1, len(out))))
    return out


def random_costs(rng) -> CostModel:
    return CostModel(10 ** rng.uniform(8.5, 10), 1e-4, 10 ** rng.uniform(8.5, 9.7), 10 ** rng.uniform(9, 10.3),
                     10 ** rng.uniform(-4, -2.5))


@pytest.mark.parametrize(("fused", "late_merge"), [(False, False), (True, False), (True, True)])
def test_closed_form_is_the_schedulers_lower_bound(fused, late_merge):
    rng = np.random.default_rng(0)
    for _ in range(150):
        tasks = state_tasks(GEOM, random_costs(rng), fused=fused, late_merge=late_merge)
        w = int(rng.integers(1, 16))
        counts = rng.multinomial(int(rng.integers(0, 10)), [0.2] * 5)
        assert makespan_bound(counts[None], tasks, w)[0] == pytest.approx(lower_bound(layer_of(counts, tasks), w),
                                                                          rel=1e-9, abs=1e-15)


def test_bound_is_close_to_the_schedulers_plans():
    """The closed-form bound (what plans batches) never exceeds the scheduler's makespan and stays close on
    average, for the fused tasks the engine runs."""
    rng = np.random.default_rng(1)
    ratios = []
    for _ in range(60):
        tasks, w = state_tasks(GEOM, random_costs(rng)), int(rng.integers(1, 16))
        counts = tuple(int(x) for x in rng.multinomial(int(rng.integers(1, 7)), [0.2] * 5))
        ratios.append(scheduled_makespan(counts, tasks, w) / makespan_bound(np.array([counts]), tasks, w)[0])
    assert min(ratios) >= 1 - 1e-9
    assert np.mean(ratios) < 1.15  # measured ≈ 1.03 (p90 ≈ 1.10, worst 1.35); unfused: 1.04 (1.16)


def test_expected_makespan_matches_monte_carlo():
    """LayerModel.expected = the mean makespan over sampled steps of the same rank model."""
    curve, sizes = snapshot(1).curves[0], (2, 8, 4, 10)
    tasks = state_tasks(GEOM, COSTS)
    model = LayerModel(tasks, W)
    active = np.random.default_rng(2).random((20_000, E)) < curve
    bounds = split_bounds(sizes, E)
    counts = np.stack([active[:, a:b].sum(axis=1) for a, b in bounds], axis=1)
    spans = makespan_bound(counts, tasks, W)
    assert model.expected(0, curve, sizes) == pytest.approx(spans.mean(), abs=4 * spans.std() / np.sqrt(len(spans)))


def check_fits(p: PoolPlan, budget_bytes: int) -> None:
    assert p.pool_bytes <= budget_bytes
    assert all(sum(s) <= E and min(s) >= 0 for s in p.sizes)


@pytest.mark.parametrize("per_call", [4, None])
def test_budget_for_everything_puts_everything_in_f(per_call):
    p = plan(snapshot(), GEOM, COSTS, W, budget(1.0) + 123, per_call=per_call)
    assert p.sizes == ((E, 0, 0, 0),) * LAYERS
    assert p.capacities == {State.F: E * LAYERS, State.C: 0, State.S: 0, State.E: 0}
    check_fits(p, budget(1.0) + 123)


def test_no_budget_means_no_pools():
    p = plan(snapshot(), GEOM, COSTS, W, 0, per_call=4)
    assert p.capacities == {s: 0 for s in (State.F, State.C, State.S, State.E)}
    assert p.predicted_s == pytest.approx(p.all_miss_s)
    assert p.pool_of(0, 0) is None


@pytest.mark.parametrize("fraction", [0.15, 0.3, 0.6])
def test_plan_fits_and_beats_single_pool_layouts(fraction):
    snap, b = snapshot(), budget(fraction)
    p = plan(snap, GEOM, COSTS, W, b, per_call=4)
    check_fits(p, b)
    model = LayerModel(state_tasks(GEOM, COSTS), W, per_call=4, mode="schedule")  # what plan() uses at top-4
    per_layer = b // LAYERS
    for pool in range(4):  # every byte in one pool, hottest ranks first
        sizes = [0, 0, 0, 0]
        sizes[pool] = min(E, per_layer // GEOM.entry_bytes[pool])
        single = sum(model.expected(i, snap.curves[i], sizes) for i in range(LAYERS))
        assert p.predicted_s <= single * (1 + 1e-9)
    assert p.predicted_s < p.all_miss_s


def test_slow_disk_covers_more_experts_and_slow_decode_prefers_f():
    b = budget(0.3)
    slow_disk = dataclasses.replace(COSTS, disk_bytes_per_s=1e6)
    slow_decode = dataclasses.replace(COSTS, decode_bytes_per_s=1e6)
    d = plan(snapshot(), GEOM, slow_disk, W, b, per_call=4).capacities
    c = plan(snapshot(), GEOM, slow_decode, W, b, per_call=4).capacities
    max_f = b // F_BYTES
    assert c[State.F] >= 0.95 * max_f  # decode is what costs: keep experts decoded
    assert d[State.C] + d[State.S] + d[State.E] > 0 and d[State.F] < c[State.F]
    assert sum(d.values()) > sum(c.values())  # compressed entries cover more experts per byte
    assert d[State.F] + d[State.C] > max_f  # even disk-free coverage (F + C) beats all-F


def test_bound_mode_choice_stays_within_its_known_gap_and_auto_mode_closes_it():
    """Fused E/MISS tails make the closed-form bound underprice decode-heavy states: on this small case its
    layout costs 21 % more under the real scheduler than schedule mode's. That gap is why mode 'auto' plans
    batch 1 (a fixed, small per-call count) with the scheduler; the bound still plans batches."""
    snap = RankSnapshot((0,), profile_curves("qwen1.5-moe-a2.7b", 1, 16, top_k=2), (100.0,))
    geom = ExpertGeometry.of(1 << 20, 1 << 20, 340_000, k=2)
    costs = CostModel(1e9, 1e-4, 5e8, 6e9, 2e-4)
    b = int(0.3 * 16 * geom.entry_bytes[0])
    by_bound = plan(snap, geom, costs, 3, b, per_call=2, mode="bound", grid=4)
    by_sched = plan(snap, geom, costs, 3, b, per_call=2, mode="schedule", grid=4)
    exact = LayerModel(state_tasks(geom, costs), 3, per_call=2, mode="schedule")
    assert exact.expected(0, snap.curves[0], by_bound.sizes[0]) <= 1.25 * by_sched.predicted_s
    assert plan(snap, geom, costs, 3, b, per_call=2, grid=4).sizes == by_sched.sizes


def test_auto_mode_prices_batch_one_with_the_scheduler_and_batches_with_the_bound():
    snap, b = snapshot(), budget(0.3)
    exact = LayerModel(state_tasks(GEOM, COSTS), W, per_call=4, mode="schedule")
    p = plan(snap, GEOM, COSTS, W, b, per_call=4)
    assert p.predicted_s == pytest.approx(sum(exact.expected(i, snap.curves[i], p.sizes[i]) for i in range(LAYERS)))
    bound = LayerModel(state_tasks(GEOM, COSTS), W, per_call=None)
    q = plan(snap, GEOM, COSTS, W, b, per_call=None)
    assert q.predicted_s == pytest.approx(sum(bound.expected(i, snap.curves[i], q.sizes[i]) for i in range(LAYERS)))


def test_fused_pricing_is_what_the_engine_runs():
    tasks = state_tasks(GEOM, COSTS)
    assert all(tasks[st].merge_s == 0 for st in HIT_STATES), "the engine decodes every load fused: no merge job"
    assert state_tasks(GEOM, COSTS, fused=False)[State.MISS].merge_s > 0


def test_refinement_gives_skewed_layers_more_f():
    curves = profile_curves("qwen1.5-moe-a2.7b", 2, E)
    flat = np.full(E, 4 / E)
    snap = RankSnapshot((0, 1), np.stack([curves[0], flat]), (100.0, 100.0))
    p = plan(snap, GEOM, COSTS, W, budget(0.25, 2), per_call=4)
    assert p.sizes[0][0] >= p.sizes[1][0]
    assert p.predicted_s <= plan(snap, GEOM, COSTS, W, budget(0.25, 2), per_call=4, refine=False).predicted_s


def test_replan_keeps_totals_and_follows_the_new_curves():
    snap = snapshot(2)
    old = plan(snap, GEOM, COSTS, W, budget(0.25, 2), per_call=4)
    flat = np.full(E, 4 / E)
    new_snap = RankSnapshot(snap.layers, np.stack([snap.curves[0], flat]), snap.observations)
    assert not needs_replan(old, snap, 0.05)
    assert needs_replan(old, new_snap, 0.05)
    new = replan(old, new_snap, GEOM, COSTS, W, per_call=4)
    assert new.capacities == old.capacities  # the cache keeps its slabs
    assert new.sizes != old.sizes and new.sizes[1][0] <= old.sizes[1][0]
    assert new.snapshot is new_snap and new.drift(new_snap) == 0.0


def test_pool_of_follows_ranges():
    p = plan(snapshot(1), GEOM, COSTS, W, budget(0.3, 1), per_call=4)
    r = p.ranges(0)
    for pool, (lo, hi) in r.items():
        assert all(p.pool_of(0, x) is pool for x in range(lo, hi))
    assert p.pool_of(0, E - 1) is (None if r[State.E][1] < E else State.E)
    assert p.pool_of(99, 0) is None and "pool plan" in p.describe()


def test_planning_without_statistics_says_what_to_do():
    from zipmoe.errors import ZipMoEError

    snap = RankSnapshot((0, 1), np.zeros((2, E)), (0.0, 0.0))
    with pytest.raises(ZipMoEError, match="seed"):
        plan(snap, GEOM, COSTS, W, budget(0.3, 2))


def test_a_plan_costs_no_more_than_the_all_c_split_under_its_own_model():
    """layout_cost prices a fixed split with plan()'s objective; the plan is never worse than all-C."""
    n_c = budget(0.25) // LAYERS // GEOM.entry_bytes[1]
    for per_call in (4, None):
        p = plan(snapshot(), GEOM, COSTS, W, budget(0.25), per_call=per_call)
        all_c = layout_cost(snapshot(), GEOM, COSTS, W, (0, n_c, 0, 0), per_call=per_call)
        assert p.predicted_s <= all_c * (1 + 1e-9)
        assert layout_cost(snapshot(), GEOM, COSTS, W, (0, 0, 0, 0), per_call=per_call) == pytest.approx(p.all_miss_s)
    with pytest.raises(ZipMoEError, match="ranks"):
        layout_cost(snapshot(), GEOM, COSTS, W, (0, E, 1, 0))


def test_a_late_merge_is_priced_no_slower_than_fused_and_faster_on_misses():
    """The shards of an E or MISS expert no longer wait for its SM read: the bound can only drop, and does
    when decoding takes a while next to the reads."""
    costs = CostModel(2e9, 1e-4, 5e8, 5e9, 1e-4)  # decode slow enough to matter
    fused, late = state_tasks(GEOM, costs), state_tasks(GEOM, costs, late_merge=True)
    rng = np.random.default_rng(2)
    counts = rng.multinomial(6, [0.2] * 5, size=200)
    a, b = makespan_bound(counts, fused, 8), makespan_bound(counts, late, 8)
    assert np.all(b <= a + 1e-12)
    miss = np.array([[0, 0, 0, 0, 4]])
    assert makespan_bound(miss, late, 8)[0] < makespan_bound(miss, fused, 8)[0]
