"""Cache-affinity scheduling: a layer's expert tasks → Plan. Pure: no torch, no threads, no I/O.

Arrow: (ExpertTask per needed expert, W) ──schedule()──▶ Plan ──▶ executor. Runs on the caller's
thread once per MoE layer call (memoised per combination of task times).

The model (precisely in scheduler/model.py): one serial I/O channel, W identical decode workers, one
serial compute stream; per expert read_e → k shard decodes → merge → compute, and read_sm → merge.
A plan fixes exactly what the executor obeys (queue semantics, scheduler/sim.py):
  * io_queue: reads back to back in this order (they have no predecessors: the channel never idles);
  * decode_queue: one FIFO of shard and merge steps; a free worker takes the next step and waits
    for its inputs, so a plan can idle a worker on purpose for an urgent step;
  * compute takes experts earliest-ready first (optimal for the last stage).
Some pair of queues reaches the model's optimum, so the plan space loses nothing.

The algorithm (the paper's idea, made concrete):
  * Type-I work (reads) is ordered by Johnson's rule on (read time, work that must follow the read):
    experts whose downstream work exceeds their read go first, shortest read first, so decoding and
    compute start early; then the rest by decreasing downstream work — the block where the pipeline
    is compute-bound is closed by feeding compute its largest remaining work first. Variants:
    Johnson on (read + decode, decode + compute), heaviest first (LPT), shortest read first, and
    E reads hoisted before SM reads.
  * Type-II work (C / E shards, released at once) fills the workers while reads run. Worker
    priorities: read order with Type-II heaviest-first before it, LPT, Johnson on (decode, compute),
    Johnson on (read + decode, decode + compute), Type-II first. Each priority yields two queues:
    the start order of a non-delay list schedule, and the strict priority order.
  * Every candidate is simulated (O(J log J)); the best is polished by a bounded first-improvement
    local search (move one read or one step earlier). Stops at once when a plan meets the lower
    bound (provably optimal). `Plan.certified_ratio` (makespan / lower bound) bounds the ratio to
    the optimum of every plan at run time.
  * The paper's (3 − 1/W)·OPT guarantee is property-tested against the exact optimum
    (exact.brute_force_optimum) on thousands of small instances in tests/scheduler; it is not
    proven for this algorithm (see the module notes in exact.py for how the oracle is exact).

# E=experts K=shards W=workers J=jobs; times in s
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

from zipmoe.errors import ZipMoEError
from zipmoe.scheduler.exact import brute_force_optimum
from zipmoe.scheduler.model import Job, Kind, Res, build_jobs, lower_bound
from zipmoe.scheduler.sim import Order, Timeline, resolve, run_list, run_queue, simulate, steps_of
from zipmoe.scheduler.tasks import DecodeStep, ExpertTask, ExpertTimes, IoStep, Plan, Plane
from zipmoe.types import ExpertKey, State

__all__ = ["Order", "brute_force_optimum", "lower_bound", "schedule", "simulate"]


def _johnson(items: Sequence[int], a: Sequence[float], b: Sequence[float]) -> list[int]:
    """Johnson's rule for a two-stage flow (optimal for two machines): a < b first by a, rest by -b."""
    first = sorted((i for i in items if a[i] < b[i]), key=lambda i: (a[i], i))
    return first + sorted((i for i in items if a[i] >= b[i]), key=lambda i: (-b[i], i))


def _stage_times(tasks: Sequence[ExpertTask], workers: int) -> tuple[list[float], list[float], list[float]]:
    """Per task: read time, decode+merge time on min(k, W) workers, compute time."""
    io = [t.read_sm_s + t.read_e_s for t in tasks]
    dec = [t.decode_s / max(1, min(t.k, workers)) + t.merge_s for t in tasks]
    return io, dec, [t.compute_s for t in tasks]


def _io_orders(tasks: Sequence[ExpertTask], workers: int) -> list[list[IoStep]]:
    """Candidate read orders (see module docstring)."""
    io_t, dec, cmp = _stage_times(tasks, workers)
    after = [(dec[e] if t.reads_e else t.merge_s) + cmp[e] for e, t in enumerate(tasks)]  # must follow reads
    reading = [e for e, t in enumerate(tasks) if t.reads_sm or t.reads_e]
    seqs = [
        _johnson(reading, io_t, after),  # Johnson on (read, downstream)
        _johnson(reading, [io_t[e] + dec[e] for e in range(len(tasks))], [dec[e] + cmp[e] for e in range(len(tasks))]),
        sorted(reading, key=lambda e: (-(io_t[e] + dec[e] + cmp[e]), e)),  # heaviest first (LPT)
        sorted(reading, key=lambda e: (io_t[e], e)),  # shortest read first
    ]

    def steps(seq: list[int], hoist_e: bool = False) -> list[IoStep]:
        e_steps = [IoStep(tasks[e].key, Plane.E) for e in seq if tasks[e].reads_e]
        sm_steps = [IoStep(tasks[e].key, Plane.SM) for e in seq if tasks[e].reads_sm]
        if hoist_e:
            return e_steps + sm_steps
        return [s for e in seq for s in (IoStep(tasks[e].key, Plane.E), IoStep(tasks[e].key, Plane.SM))
                if (tasks[e].reads_e if s.plane == Plane.E else tasks[e].reads_sm)]

    return [steps(q) for q in seqs] + [steps(seqs[0], hoist_e=True)]


def _ranks(tasks: Sequence[ExpertTask], io: list[IoStep], workers: int) -> list[list[int]]:
    """Candidate expert priorities on the workers, as rank per task (see module docstring)."""
    pos: dict[ExpertKey, int] = {}
    for i, s in enumerate(io):
        pos.setdefault(s.key, i)
    io_t, dec, cmp = _stage_times(tasks, workers)
    at = [pos.get(t.key, -1) for t in tasks]  # Type-II work first, then by read order
    idx = range(len(tasks))
    seqs = [
        sorted(idx, key=lambda e: (at[e], -(dec[e] + cmp[e]), e)),  # read order, Type-II LPT before
        sorted(idx, key=lambda e: (-(dec[e] + cmp[e]), e)),  # heaviest chain first (LPT)
        _johnson(idx, dec, cmp),  # Johnson on (decode, compute)
        _johnson(idx, [io_t[e] + dec[e] for e in idx], [dec[e] + cmp[e] for e in idx]),
        sorted(idx, key=lambda e: (tasks[e].state not in (State.C, State.E), -(dec[e] + cmp[e]), e)),
    ]
    out = []
    for seq in seqs:
        rank = [0] * len(tasks)
        for r, e in enumerate(seq):
            rank[e] = r
        out.append(rank)
    return out


_SMALL = 64  # jobs; larger layers get the 2 x 3 main candidates and a local search budget scaled by 64 / J


def _candidates(tasks: Sequence[ExpertTask], jobs: list[Job], workers: int
                ) -> Iterator[tuple[list[int], list[int], list[IoStep]]]:
    """(io job order, worker job order, io steps) of every heuristic candidate."""
    worker_jobs = [j for j in jobs if j.res == Res.WORKER]
    io_of = {(j.expert, j.kind): j.id for j in jobs if j.res == Res.IO}
    index = {t.key: e for e, t in enumerate(tasks)}
    small = len(jobs) <= _SMALL
    for io in _io_orders(tasks, workers)[: None if small else 2]:
        io_seq = [j for j in (io_of.get((index[s.key], _KIND[s.plane])) for s in io) if j is not None]
        for rank in _ranks(tasks, io, workers)[: None if small else 3]:
            prio = [(0 if j.kind == Kind.MERGE else 1, rank[j.expert], j.shard) for j in jobs]
            yield io_seq, run_list(jobs, workers, io_seq, prio), io
            strict = sorted(worker_jobs, key=lambda j: (rank[j.expert], j.kind, j.shard))
            yield io_seq, [j.id for j in strict], io


_KIND = {Plane.E: Kind.READ_E, Plane.SM: Kind.READ_SM}


def _improve(jobs: list[Job], workers: int, seqs: list[list[int]], best: float, budget: int) -> float:
    """First-improvement local search: move one read or one worker step earlier; `seqs` = [io, worker]."""
    ranks = range(1 + max((j.expert for j in jobs), default=0))
    improved = True
    while improved and budget > 0:
        improved = False
        for which, seq in enumerate(seqs):
            for i in range(1, len(seq)):
                preds = set(jobs[seq[i]].preds)
                for to in range(i - 1, -1, -1):
                    if seq[to] in preds:
                        break  # cannot pass its own predecessor
                    cand = [*seq[:to], seq[i], *seq[to:i], *seq[i + 1:]]
                    trial = [cand, seqs[1]] if which == 0 else [seqs[0], cand]
                    span = run_queue(jobs, workers, trial[0], trial[1], ranks).makespan
                    budget -= 1
                    if span < best * (1 - 1e-12):
                        seqs[which], best, improved = cand, span, True
                        break
                    if budget <= 0:
                        return best
                if improved:
                    break
            if improved:
                break
    return best


_MEMO: dict[tuple, tuple[Plan, tuple]] = {}  # rounded instance -> (plan on placeholder keys, exact instance)
_MEMO_MAX = 4096


def _rounded(x: float) -> float:
    return float(f"{x:.3g}")  # 3 significant digits: compressed sizes vary a little from expert to expert


def schedule(tasks: Sequence[ExpertTask], workers: int, effort: int = 64, exact_times: bool = True) -> Plan:
    """The plan for one layer: the best simulated candidate of the cache-affinity heuristics, then at
    most `effort` local-search simulations (0: candidates only). Stops early at a provably optimal
    plan (makespan == lower bound). The decisions are memoised by the tasks' times to 3 significant
    digits, so a layer whose experts share shapes pays the search once per combination of states;
    a near match is re-simulated with the exact times, unless exact_times=False: then its predicted
    times are the memoised plan's (within the rounding). The engine passes False: it only obeys the
    queues, and compressed experts differ in size, so re-simulating cost ~0.5 ms per layer call."""
    if workers < 1:
        raise ZipMoEError(f"workers must be >= 1, got {workers}")
    if len({t.key for t in tasks}) != len(tasks):
        raise ZipMoEError("tasks name the same expert twice; give each needed expert once")
    sig = [(t.state, t.read_sm_s, t.read_e_s, t.decode_s, t.merge_s, t.compute_s, t.k, t.late_merge) for t in tasks]
    rounded = [(s[0], *map(_rounded, s[1:6]), *s[6:]) for s in sig]
    perm = sorted(range(len(tasks)), key=lambda e: (rounded[e], sig[e]))
    memo_key = (workers, effort, tuple(rounded[e] for e in perm))
    exact = tuple(sig[e] for e in perm)
    hit = _MEMO.get(memo_key)
    if hit is None:
        canonical = [dataclasses.replace(tasks[e], key=ExpertKey(-1, n)) for n, e in enumerate(perm)]
        hit = (_search(canonical, workers, effort), exact)
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        _MEMO[memo_key] = hit
    plan = _relabel(hit[0], tasks, [tasks[e].key for e in perm])
    return plan if hit[1] == exact or not exact_times else _resimulate(plan)


def _resimulate(plan: Plan) -> Plan:
    """The same queues with the predicted timeline recomputed for the plan's own task times."""
    tasks, order = plan.tasks, range(len(plan.tasks))
    jobs = build_jobs(tasks)
    io_seq, wk_seq = resolve(tasks, jobs, Order(plan.io_queue, plan.decode_queue))
    tl = run_queue(jobs, plan.workers, io_seq, wk_seq, order)
    times = _expert_times(tasks, jobs, tl)
    compute_order = tuple(tasks[e].key for e in sorted(order, key=lambda e: (times[e].ready, e)))
    return dataclasses.replace(plan, compute_order=compute_order, predicted=tuple(times), makespan_s=tl.makespan,
                               lower_bound_s=lower_bound(tasks, plan.workers))


def _relabel(template: Plan, tasks: Sequence[ExpertTask], keys: list[ExpertKey]) -> Plan:
    """The template plan with placeholder key ExpertKey(-1, n) renamed to keys[n]."""
    times = {keys[e.key.expert]: dataclasses.replace(e, key=keys[e.key.expert]) for e in template.predicted}
    return Plan(
        tasks=tuple(tasks),
        workers=template.workers,
        io_queue=tuple(IoStep(keys[s.key.expert], s.plane) for s in template.io_queue),
        decode_queue=tuple(DecodeStep(keys[s.key.expert], s.shard) for s in template.decode_queue),
        compute_order=tuple(keys[k.expert] for k in template.compute_order),
        predicted=tuple(times[t.key] for t in tasks),
        makespan_s=template.makespan_s,
        lower_bound_s=template.lower_bound_s,
    )


def _search(tasks: Sequence[ExpertTask], workers: int, effort: int) -> Plan:
    """Candidates, then local search; see schedule()."""
    jobs = build_jobs(tasks)
    order = range(len(tasks))
    bound = lower_bound(tasks, workers)
    best: tuple[float, list[int], list[int], list[IoStep]] | None = None
    seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    for io_seq, wk_seq, io in _candidates(tasks, jobs, workers):
        if (tuple(io_seq), tuple(wk_seq)) in seen:
            continue
        seen.add((tuple(io_seq), tuple(wk_seq)))
        span = run_queue(jobs, workers, io_seq, wk_seq, order).makespan
        if best is None or span < best[0]:
            best = (span, io_seq, wk_seq, io)
            if span <= bound * (1 + 1e-9):
                break  # provably optimal
    assert best is not None
    seqs = [list(best[1]), list(best[2])]
    makespan = best[0]
    if effort > 0 and makespan > bound * (1 + 1e-9):
        makespan = _improve(jobs, workers, seqs, makespan, effort * min(len(jobs), _SMALL) // len(jobs))
    io_id = {(j.expert, j.kind): j.id for j in jobs if j.res == Res.IO}
    index = {t.key: e for e, t in enumerate(tasks)}
    step_of = {io_id[(index[s.key], _KIND[s.plane])]: s for s in best[3] if (index[s.key], _KIND[s.plane]) in io_id}
    io = [step_of[j] for j in seqs[0]] + [s for s in best[3] if (index[s.key], _KIND[s.plane]) not in io_id]
    times = _expert_times(tasks, jobs, run_queue(jobs, workers, seqs[0], seqs[1], order))
    compute_order = tuple(tasks[e].key for e in sorted(order, key=lambda e: (times[e].ready, e)))
    plan = Plan(tuple(tasks), workers, tuple(io), steps_of(jobs, tasks, seqs[1]), compute_order, tuple(times),
                makespan, bound)
    resolve(tasks, jobs, Order(plan.io_queue, plan.decode_queue))  # cheap self-check of the queues
    return plan


def _expert_times(tasks: Sequence[ExpertTask], jobs: list[Job], tl: Timeline) -> list[ExpertTimes]:
    """Per-expert stage times from a job timeline (nan where the expert has no such stage)."""
    mine: list[list[Job]] = [[] for _ in tasks]
    for j in jobs:
        mine[j.expert].append(j)
    out = []
    for t, js in zip(tasks, mine, strict=True):
        def span(kinds: tuple[Kind, ...], js: list[Job] = js) -> tuple[float, float]:
            sel = [j.id for j in js if j.kind in kinds]
            return (min(tl.start[i] for i in sel), max(tl.end[i] for i in sel)) if sel else (math.nan, math.nan)

        io, dec, cmp = span((Kind.READ_E, Kind.READ_SM)), span((Kind.SHARD, Kind.MERGE)), span((Kind.COMPUTE,))
        ready = max((tl.end[j.id] for j in js if j.kind != Kind.COMPUTE), default=0.0)
        cs, ce = (ready, ready) if math.isnan(cmp[0]) else cmp
        out.append(ExpertTimes(t.key, io[0], io[1], dec[0], dec[1], ready, cs, ce))
    return out
