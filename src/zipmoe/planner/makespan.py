"""Expected layer makespan of a pool layout: hit distribution (poisson_binomial) × the scheduler's model.

Arrow: (rank curve p_r, ranks per pool, ExpertGeometry, CostModel, W) ──▶ E[layer makespan] in s, the
objective capacity.py minimises. Two makespan models per hit combination (f, c, s, e, m):
  * "bound" (default): the scheduler's lower_bound (scheduler/model.py) in closed form for experts of
    one shape, vectorised over every combination at once. The scheduler's plans sit close to it
    (tests/planner measure the gap), and it is what makes a full capacity search take well under 1 s.
  * "schedule": the makespan of scheduler.schedule()'s actual plan, memoised per combination; exact
    for our scheduler but ~ms per new combination (fine at batch 1 with the exact-k conditioning:
    C(k+4, 4) combinations, 70 for top-4). The planner picks it whenever the per-call count is fixed
    and small (capacity.py, mode "auto"): the closed-form bound underprices fused E/MISS tails, and
    its choice came out 21 % slower than schedule mode's in one of five small cases.
Pure numerics on the planning thread.

# P=pools (F, C, S, E, miss) M=hit combinations W=decode workers; sizes in bytes, times in s
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from zipmoe.errors import ZipMoEError
from zipmoe.planner.poisson_binomial import joint_hits, pmf, split_bounds
from zipmoe.scheduler.schedule import schedule
from zipmoe.scheduler.tasks import CostModel, ExpertTask
from zipmoe.types import ExpertKey, State

POOLS = (State.F, State.C, State.S, State.E)  # rank order of the pools: hottest ranks first (capacity.py)
HIT_STATES = (*POOLS, State.MISS)  # column order of hit-count combinations
PAGE = 4096  # host slot alignment of the cache (cache/pools.py entry_bytes)


def _align(n: int, align: int) -> int:
    return -(-int(n) // align) * align


@dataclass(frozen=True, slots=True)
class ExpertGeometry:
    """What one expert costs in memory and on disk (every routed expert has the same shape)."""

    numel: int  # BF16 weights per expert
    sm_bytes: int  # stored SM plane (one disk read)
    e_bytes: int  # stored compressed exponent shards of a typical (mean) expert (one disk read)
    k: int  # exponent shards per expert (parallel decode jobs)
    entry_bytes: tuple[int, int, int, int]  # budget bytes of one F, C, S, E pool entry, padding included

    def __post_init__(self) -> None:
        if min(self.numel, self.sm_bytes, self.e_bytes, self.k) <= 0 or min(self.entry_bytes) <= 0:
            raise ZipMoEError(f"expert geometry must be positive, got {self}")

    @classmethod
    def of(cls, numel: int, sm_bytes: int, e_bytes: int, k: int, e_slot_bytes: int | None = None,
           align: int = PAGE) -> ExpertGeometry:
        """Entry sizes as ExpertCache counts them: F = 2·numel, S = aligned SM, E = aligned E slot, C = S + E."""
        sm, e = _align(sm_bytes, align), _align(e_slot_bytes or e_bytes, align)
        return cls(numel, sm_bytes, e_bytes, k, (2 * numel, sm + e, sm, e))


def state_tasks(geom: ExpertGeometry, costs: CostModel, fused: bool = True,
                late_merge: bool = False) -> dict[State, ExpertTask]:
    """The task one expert is in each state (placeholder keys). fused=True (default) prices every load as
    the engine runs it by default: no merge job, and an E/MISS expert's shards wait for its SM read.
    late_merge=True as load(late_merge=True) runs it: no merge job, and the shards do not wait for the SM
    read. fused=False without late_merge is the paper's model (a separate merge per expert)."""
    return {st: costs.task(ExpertKey(-1, int(st)), st, geom.sm_bytes, geom.e_bytes, geom.numel, geom.k,
                           fused=fused and not late_merge and st is not State.F, late_merge=late_merge)
            for st in HIT_STATES}


def makespan_bound(counts: np.ndarray, tasks: dict[State, ExpertTask], workers: int) -> np.ndarray:
    """scheduler.lower_bound of every hit combination [M, 5] (f, c, s, e, m) in closed form, [M] s."""
    c = np.asarray(counts, dtype=np.float64)
    present = c > 0
    t = [tasks[st] for st in HIT_STATES]
    shard = [x.decode_s / x.k if x.decodes else 0.0 for x in t]
    # fused (merge_s = 0, no late merge; scheduler/model.py): an E or MISS task's shards wait for its SM read
    fused_e, fused_m = t[3].shards_need_sm, t[4].shards_need_sm
    # per state: earliest time its weights can be ready (the chain before compute)
    head = np.array([0.0, shard[1] + t[1].merge_s, t[2].read_e_s + shard[2] + t[2].merge_s,
                     t[3].read_sm_s + shard[3] if fused_e else max(t[3].read_sm_s, shard[3]) + t[3].merge_s,
                     max(t[4].read_e_s, t[4].read_sm_s) + shard[4] if fused_m
                     else max(t[4].read_e_s + shard[4], t[4].read_sm_s) + t[4].merge_s])
    cp = np.array([x.compute_s for x in t])
    inf = np.inf
    chain = np.where(present, head + cp, 0.0).max(axis=1)
    work = (c[:, 1:] * np.array([x.decode_s + x.merge_s for x in t[1:]])).sum(axis=1) / workers
    reads = c @ np.array([x.read_sm_s + x.read_e_s for x in t])
    # least work that must follow any read present: after an SM read the merge (fused: the shards) and
    # compute, after an E read the shards, merge and compute
    after_read = np.array([
        inf, inf, shard[2] + t[2].merge_s + cp[2],
        (shard[3] if fused_e else t[3].merge_s) + cp[3],
        min(shard[4] if fused_m else t[4].merge_s, shard[4] + t[4].merge_s) + cp[4]])
    after = np.where(present, after_read, inf).min(axis=1)
    io = np.where(reads > 0, reads + after, 0.0)
    first = np.where(present, head, inf).min(axis=1)
    compute = np.where(c.sum(axis=1) > 0, first + c @ cp, 0.0)
    return np.maximum.reduce([chain, work, io, compute])


class LayerModel:
    """E[makespan] of one layer for any pool sizes; memoises range PMFs (and schedules) across calls."""

    def __init__(self, tasks: dict[State, ExpertTask], workers: int, *, per_call: int | None = None,
                 mode: str = "bound", cutoff: float = 1e-9):
        if mode not in ("bound", "schedule"):
            raise ZipMoEError(f"makespan mode must be 'bound' or 'schedule', got {mode!r}")
        if workers < 1:
            raise ZipMoEError(f"workers must be >= 1, got {workers}")
        self.tasks, self.workers, self.per_call, self.mode, self.cutoff = tasks, workers, per_call, mode, cutoff
        self._pmfs: dict[tuple[int, int, int], np.ndarray] = {}
        self._spans: dict[tuple[int, ...], float] = {}

    def expected(self, curve_id: int, curve: np.ndarray, sizes: Sequence[int]) -> float:
        """E[makespan] (s) of a layer with rank curve `curve` (id: memo key) and pool sizes (F, C, S, E)."""
        pmfs = []
        for lo, hi in split_bounds(sizes, len(curve)):
            key = (curve_id, lo, hi)
            if key not in self._pmfs:
                self._pmfs[key] = pmf(curve[lo:hi])
            pmfs.append(self._pmfs[key])
        counts, probs = joint_hits(pmfs, self.cutoff, self.per_call)
        if not len(probs):
            return 0.0
        return float(probs @ self.spans(counts) / probs.sum())

    def spans(self, counts: np.ndarray) -> np.ndarray:
        """Makespan (s) of each hit combination [M, 5] under this model's mode."""
        if self.mode == "bound":
            return makespan_bound(counts, self.tasks, self.workers)
        out = np.empty(len(counts))
        for i, row in enumerate(counts):
            key = tuple(int(x) for x in row)
            if key not in self._spans:
                self._spans[key] = scheduled_makespan(key, self.tasks, self.workers)
            out[i] = self._spans[key]
        return out


def scheduled_makespan(counts: Sequence[int], tasks: dict[State, ExpertTask], workers: int) -> float:
    """Makespan of scheduler.schedule()'s plan for a layer with these hits per state (f, c, s, e, m)."""
    layer: list[ExpertTask] = []
    for st, n in zip(HIT_STATES, counts, strict=True):
        for _ in range(n):
            layer.append(ExpertTask(ExpertKey(-1, len(layer)), *_fields(tasks[st])))
    return schedule(layer, workers).makespan_s if layer else 0.0


def _fields(t: ExpertTask) -> tuple:
    return (t.state, t.read_sm_s, t.read_e_s, t.decode_s, t.merge_s, t.compute_s, t.k)
