"""The resource model every scheduler function is judged in: a layer's tasks as a job DAG.

Resources: IO = one channel (serial), WORKER = W identical decode workers, COMPUTE = one stream
(serial). Every job needs exactly one unit of one resource for its whole duration, non-preemptively.
Per expert j (jobs of duration <= 1e-9 × the instance's total work count as 0: they are dropped, their
edges contracted, and they need no resource — this keeps float rounding out of the exact search):

    read_e (IO, S/MISS) ──▶ k shard jobs (WORKER, decode_s/k each) ──▶ merge (WORKER) ──▶ compute (COMPUTE)
    read_sm (IO, E/MISS) ─────────────────────────────────────────────▲

A task without a merge job (merge_s = 0: each shard decodes and merges in place) that reads its SM
plane has read_sm as a predecessor of every shard job instead (fused: the shards need the SM bytes),
unless it merges late (late_merge: the shards decode exponents only; compute follows shards and read_sm).
E/C shards have no predecessor (Type-II work). F experts have only the compute job. Different experts
are independent. The makespan is the largest completion time. Any start times that respect these
edges and the capacities are a feasible schedule; `exact.brute_force_optimum` is the optimum over
all of them, `schedule.simulate` evaluates one priority order as a non-delay list schedule.

# E=experts K=shards W=workers; times in s
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from zipmoe.scheduler.tasks import ExpertTask


class Res(enum.IntEnum):
    """The three resource kinds."""

    IO = 0
    WORKER = 1
    COMPUTE = 2


class Kind(enum.IntEnum):
    """What a job does (IO jobs say which plane)."""

    READ_E = 0
    READ_SM = 1
    SHARD = 2
    MERGE = 3
    COMPUTE = 4


_RES = {Kind.READ_E: Res.IO, Kind.READ_SM: Res.IO, Kind.SHARD: Res.WORKER, Kind.MERGE: Res.WORKER,
        Kind.COMPUTE: Res.COMPUTE}


@dataclass(frozen=True, slots=True)
class Job:
    """One node of the DAG."""

    id: int  # index into the job list
    expert: int  # index of its task
    kind: Kind  # what it does
    shard: int  # shard index for SHARD jobs, else 0
    p: float  # duration, s (> 0)
    preds: tuple[int, ...]  # job ids that must complete before it starts
    res: Res  # the resource it occupies (follows from kind)


def build_jobs(tasks: Sequence[ExpertTask]) -> list[Job]:
    """The DAG of the module docstring, non-negligible jobs only, in topological order."""
    jobs: list[Job] = []
    tiny = 1e-9 * sum(t.read_sm_s + t.read_e_s + t.decode_s + t.merge_s + t.compute_s for t in tasks)

    def add(expert: int, kind: Kind, p: float, preds: tuple[int, ...], shard: int = 0) -> tuple[int, ...]:
        if p <= tiny:
            return preds  # contracted: successors inherit the predecessors
        jobs.append(Job(len(jobs), expert, kind, shard, p, preds, _RES[kind]))
        return (len(jobs) - 1,)

    for j, t in enumerate(tasks):
        before_compute: tuple[int, ...] = ()
        if t.decodes:
            after_e = add(j, Kind.READ_E, t.read_e_s, ())
            sm = add(j, Kind.READ_SM, t.read_sm_s, ())
            # fused (no merge job, no late merge): each shard merges in place, so it needs the SM plane too
            in_place = t.merge_s <= tiny and not t.late_merge  # ExpertTask.shards_need_sm, with the tiny cut
            shard_preds = tuple(sorted(set(after_e + sm))) if in_place else after_e
            shards: tuple[int, ...] = ()
            for i in range(t.k):
                shards += add(j, Kind.SHARD, t.decode_s / t.k, shard_preds, i)
            merge_preds = tuple(sorted(set(shards + sm + after_e)))
            before_compute = add(j, Kind.MERGE, t.merge_s, merge_preds)
        add(j, Kind.COMPUTE, t.compute_s, before_compute)
    return jobs


def tails(jobs: Sequence[Job]) -> list[float]:
    """Longest path from each job's start to the end of the DAG (its own duration included)."""
    succs: list[list[int]] = [[] for _ in jobs]
    for job in jobs:
        for p in job.preds:
            succs[p].append(job.id)
    tail = [0.0] * len(jobs)
    for job in reversed(jobs):  # topological order reversed
        tail[job.id] = job.p + max((tail[s] for s in succs[job.id]), default=0.0)
    return tail


def heads(jobs: Sequence[Job]) -> list[float]:
    """Earliest start of each job ignoring capacities (longest path into it)."""
    head = [0.0] * len(jobs)
    for job in jobs:
        head[job.id] = max((head[p] + jobs[p].p for p in job.preds), default=0.0)
    return head


def lower_bound(tasks: Sequence[ExpertTask], workers: int) -> float:
    """A makespan no feasible schedule beats: max of per-resource loads and the longest chain.

    IO: all reads plus the shortest work that must follow a read; COMPUTE: all compute plus the
    shortest head before any compute; WORKER: total work / W; chain: the longest path.
    """
    jobs = build_jobs(tasks)
    if not jobs:
        return 0.0
    head, tail = heads(jobs), tails(jobs)
    bound = max(h + t for h, t in zip(head, tail, strict=True))
    by_res: dict[Res, list[Job]] = {r: [j for j in jobs if j.res == r] for r in Res}
    if by_res[Res.WORKER]:
        bound = max(bound, sum(j.p for j in by_res[Res.WORKER]) / workers)
    if by_res[Res.IO]:
        after = min(tail[j.id] - j.p for j in by_res[Res.IO])
        bound = max(bound, sum(j.p for j in by_res[Res.IO]) + after)
    if by_res[Res.COMPUTE]:
        before = min(head[j.id] for j in by_res[Res.COMPUTE])
        bound = max(bound, before + sum(j.p for j in by_res[Res.COMPUTE]))
    return bound
