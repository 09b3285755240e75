"""Event simulations of plans under the resource model (scheduler/model.py). Pure, no threads.

Two semantics:
  * queue semantics — what the Executor does and what a Plan means. Reads run back to back in
    io_queue order. decode_queue is one FIFO: a worker that becomes free takes the next step and
    holds it until its inputs are ready (read_e for a shard; every shard and read_sm for a merge),
    then runs it. Compute takes experts earliest-ready first (ties by task order). With suitable
    queues this reaches the optimum of the model: the optimum is a semi-active schedule fixed by a
    start order per resource, and the queue run of that order starts no job later (by induction
    over the start order). `simulate` uses this semantics.
  * list semantics — a non-delay list schedule by priority; the scheduler uses it to produce
    candidate queues (the start order it yields is then run with queue semantics).

# J=jobs W=workers; times in s
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

from zipmoe.errors import ZipMoEError
from zipmoe.scheduler.model import Job, Kind, Res, build_jobs
from zipmoe.scheduler.tasks import MERGE, DecodeStep, ExpertTask, IoStep, Plan, Plane

_IO_KIND = {Plane.E: Kind.READ_E, Plane.SM: Kind.READ_SM}


@dataclass(frozen=True, slots=True)
class Order:
    """The decisions of a plan, without its predicted timeline."""

    io_queue: tuple[IoStep, ...]  # reads in channel order
    decode_queue: tuple[DecodeStep, ...]  # worker steps in queue order


@dataclass(slots=True)
class Timeline:
    """Start and end of every job of one simulated run."""

    start: list[float]  # per job id, s
    end: list[float]  # per job id, s
    makespan: float  # s


def _computes(jobs: Sequence[Job], end: list[float], start: list[float], rank: Sequence[int]) -> float:
    """Run compute jobs earliest-ready first on the serial stream (optimal for a last stage)."""
    queue = sorted((max((end[p] for p in j.preds), default=0.0), rank[j.expert], j.id)
                   for j in jobs if j.res == Res.COMPUTE)
    t = 0.0
    for r, _, jid in queue:
        start[jid] = max(t, r)
        end[jid] = t = start[jid] + jobs[jid].p
    return max(end, default=0.0)


def _reads(jobs: Sequence[Job], io_seq: Sequence[int], start: list[float], end: list[float]) -> None:
    t = 0.0
    for jid in io_seq:
        start[jid], end[jid] = t, t + jobs[jid].p
        t = end[jid]


def run_queue(jobs: Sequence[Job], workers: int, io_seq: Sequence[int], wk_seq: Sequence[int],
              rank: Sequence[int]) -> Timeline:
    """Queue semantics; wk_seq must list every worker job once, predecessors first."""
    n = len(jobs)
    start, end = [math.nan] * n, [math.nan] * n
    _reads(jobs, io_seq, start, end)
    free = [0.0] * workers  # heap of worker free times
    grab = 0.0  # time the previous step was taken from the queue
    for jid in wk_seq:
        grab = max(grab, heapq.heappop(free))
        ready = max((end[p] for p in jobs[jid].preds), default=0.0)
        start[jid] = max(grab, ready)
        end[jid] = start[jid] + jobs[jid].p
        heapq.heappush(free, end[jid])
    return Timeline(start, end, _computes(jobs, end, start, rank))


def run_list(jobs: Sequence[Job], workers: int, io_seq: Sequence[int], prio: Sequence[tuple]) -> list[int]:
    """Non-delay list schedule with per-job priorities (smaller first); returns the worker start order."""
    npreds = [sum(jobs[p].res != Res.IO for p in j.preds) for j in jobs]
    succs: list[list[int]] = [[] for _ in jobs]
    for j in jobs:
        for p in j.preds:
            succs[p].append(j.id)
    start, end = [math.nan] * len(jobs), [math.nan] * len(jobs)
    _reads(jobs, io_seq, start, end)
    pending = [(max((end[p] for p in j.preds if jobs[p].res == Res.IO), default=0.0), j.id)
               for j in jobs if j.res == Res.WORKER and npreds[j.id] == 0]
    heapq.heapify(pending)  # (release time, job) whose worker predecessors are done
    ready: list[tuple] = []
    running: list[tuple[float, int]] = []
    order: list[int] = []
    t = 0.0
    while pending or ready or running:
        while pending and pending[0][0] <= t:
            heapq.heappush(ready, (prio[pending[0][1]], heapq.heappop(pending)[1]))
        while ready and len(running) < workers:
            jid = heapq.heappop(ready)[1]
            order.append(jid)
            end[jid] = t + jobs[jid].p
            heapq.heappush(running, (end[jid], jid))
        t = min(running[0][0] if running else math.inf, pending[0][0] if pending else math.inf)
        while running and running[0][0] <= t:
            jid = heapq.heappop(running)[1]
            for c in succs[jid]:
                npreds[c] -= 1
                if npreds[c] == 0 and jobs[c].res == Res.WORKER:
                    rel = max(end[p] for p in jobs[c].preds)
                    heapq.heappush(pending, (rel, c))
    return order


def resolve(tasks: Sequence[ExpertTask], jobs: Sequence[Job], order: Order) -> tuple[list[int], list[int]]:
    """Job ids of the two queues; checks that they name every step once, predecessors first."""
    index = {t.key: i for i, t in enumerate(tasks)}
    job_of = {(j.expert, j.kind, j.shard): j.id for j in jobs if j.res != Res.COMPUTE}
    steps_io = [(s.key, _IO_KIND[s.plane], 0) for s in order.io_queue]
    steps_wk = [(s.key, Kind.MERGE if s.shard == MERGE else Kind.SHARD, max(s.shard, 0))
                for s in order.decode_queue]
    want_io = {(t.key, Kind.READ_E, 0) for t in tasks if t.reads_e}
    want_io |= {(t.key, Kind.READ_SM, 0) for t in tasks if t.reads_sm}
    want_wk = {(t.key, Kind.SHARD, i) for t in tasks if t.decodes for i in range(t.k)}
    want_wk |= {(t.key, Kind.MERGE, 0) for t in tasks if t.decodes and t.merge_s > 0}
    for got, want, what in ((steps_io, want_io, "io_queue"), (steps_wk, want_wk, "decode_queue")):
        if len(got) != len(set(got)) or set(got) != want:
            raise ZipMoEError(f"plan's {what} must list each step of the tasks exactly once")
    io_seq = [job_of[(index[k], kind, i)] for k, kind, i in steps_io if (index[k], kind, i) in job_of]
    wk_seq = [job_of[(index[k], kind, i)] for k, kind, i in steps_wk if (index[k], kind, i) in job_of]
    pos = {jid: n for n, jid in enumerate(wk_seq)}
    if any(jobs[p].res == Res.WORKER and pos[p] > pos[j] for j in wk_seq for p in jobs[j].preds):
        raise ZipMoEError("plan's decode_queue must put each expert's shards before its merge")
    return io_seq, wk_seq


def simulate(plan_or_order: Plan | Order, tasks: Sequence[ExpertTask], workers: int) -> float:
    """Makespan (s) of running `plan_or_order`'s queues on `tasks` under the model (queue semantics)."""
    if workers < 1:
        raise ZipMoEError(f"workers must be >= 1, got {workers}")
    jobs = build_jobs(tasks)
    io_seq, wk_seq = resolve(tasks, jobs, Order(plan_or_order.io_queue, plan_or_order.decode_queue))
    return run_queue(jobs, workers, io_seq, wk_seq, range(len(tasks))).makespan


def steps_of(jobs: Sequence[Job], tasks: Sequence[ExpertTask], wk_seq: Sequence[int]
             ) -> tuple[DecodeStep, ...]:
    """Decode queue for a worker job order. An expert has a MERGE step only when merge_s > 0 (else
    decode_shard merged in place and the expert is ready when its last input lands). Steps too short
    to be jobs in the model go right after their inputs: shards before the merge, a merge right after
    the last shard; an expert with neither goes last."""
    out: list[DecodeStep] = []
    left = [t.k for t in tasks]  # shards not yet queued, per expert

    def shard(e: int, i: int) -> None:
        out.append(DecodeStep(tasks[e].key, i))
        left[e] -= 1
        if left[e] == 0 and tasks[e].merge_s > 0 and not has_merge[e]:
            out.append(DecodeStep(tasks[e].key, MERGE))

    has_merge = [False] * len(tasks)
    for j in jobs:
        has_merge[j.expert] |= j.kind == Kind.MERGE
    for jid in wk_seq:
        e = jobs[jid].expert
        if jobs[jid].kind == Kind.SHARD:
            shard(e, jobs[jid].shard)
            continue
        for i in range(tasks[e].k - left[e], tasks[e].k):  # shards with no job: queued just before
            shard(e, i)
        out.append(DecodeStep(tasks[e].key, MERGE))
    for e, t in enumerate(tasks):
        if t.decodes and left[e]:
            for i in range(t.k - left[e], t.k):
                shard(e, i)
            if has_merge[e]:
                raise AssertionError("merge job missing from the worker order")
    return tuple(out)
