"""Exact optimum of the scheduler's resource model (scheduler/model.py), for small instances.

Used as the oracle of the (3 − 1/W) property test and never on the hot path. Pure Python.

Search: branch and bound over *active* schedules built in non-decreasing start-time order. For a
regular objective such as the makespan some optimal schedule is active, and every active schedule
is reached: at each node any job whose predecessors are placed may start next, at the earliest time
its predecessors, its resource and the chronological order allow (deliberate idling included —
a job may be placed after a later-ready one). Two dominance rules cut branches without losing that
schedule: identical shards of one expert are placed in index order, and a job j is not placed
next if another eligible job j' of the same resource could run entirely before j starts
(Giffler–Thompson: j' can be inserted there without delaying j or anything after it). Branches
whose lower bound (resource loads from the current state, longest remaining paths) reaches the
best makespan found are pruned.

# J=jobs W=workers; times in s
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from zipmoe.errors import ZipMoEError
from zipmoe.scheduler.model import Job, Kind, Res, build_jobs, tails
from zipmoe.scheduler.tasks import ExpertTask

_MAX_JOBS = 24  # beyond this the search can take minutes; the oracle is for small instances only


class _Search:
    """Mutable DFS state; one instance per brute_force_optimum call."""

    def __init__(self, jobs: list[Job], workers: int, upper: float):
        self.jobs, self.W, self.best = jobs, workers, upper
        self.tail = tails(jobs)
        self.finish: list[float | None] = [None] * len(jobs)
        self.io_free = 0.0
        self.cmp_free = 0.0
        self.wk_free = [0.0] * workers
        self.left = {r: sum(j.p for j in jobs if j.res == r) for r in Res}  # unplaced work, s
        self.nleft = {r: sum(j.res == r for j in jobs) for r in Res}  # unplaced jobs
        self.npreds = [len(j.preds) for j in jobs]
        self.succs: list[list[int]] = [[] for _ in jobs]
        for j in jobs:
            for p in j.preds:
                self.succs[p].append(j.id)
        self.io_after = [self.tail[j.id] - j.p for j in jobs]  # work that must follow each job
        self.placed = 0
        self.nodes = 0
        self.seen: dict[tuple, float] = {}  # transposition table: search state -> best prefix makespan

    def res_free(self, res: Res) -> float:
        if res == Res.IO:
            return self.io_free
        if res == Res.COMPUTE:
            return self.cmp_free
        return min(self.wk_free)

    def est(self, job: Job, t: float) -> float:
        ready = max((self.finish[p] for p in job.preds), default=0.0)  # type: ignore[type-var]
        return max(t, ready, self.res_free(job.res))

    def eligible(self) -> list[Job]:
        out, seen_shard = [], set()
        for job in self.jobs:
            if self.finish[job.id] is not None or self.npreds[job.id]:
                continue
            if job.kind == Kind.SHARD:
                if job.expert in seen_shard:
                    continue  # identical shards go in index order
                seen_shard.add(job.expert)
            out.append(job)
        return out

    def bound(self, t: float, span: float) -> float:
        lb = span
        est_lb = [0.0] * len(self.jobs)
        for job in self.jobs:  # topological order
            f = self.finish[job.id]
            if f is not None:
                est_lb[job.id] = f - job.p
                continue
            s = max([t] + [est_lb[p] + self.jobs[p].p for p in job.preds])
            est_lb[job.id] = s
            lb = max(lb, s + self.tail[job.id])
        if self.nleft[Res.IO]:
            after = min(self.io_after[j.id] for j in self.jobs if j.res == Res.IO and self.finish[j.id] is None)
            lb = max(lb, max(t, self.io_free) + self.left[Res.IO] + after)
        if self.nleft[Res.COMPUTE]:
            lb = max(lb, max(t, self.cmp_free) + self.left[Res.COMPUTE])
        if self.nleft[Res.WORKER]:
            lb = max(lb, (sum(max(t, f) for f in self.wk_free) + self.left[Res.WORKER]) / self.W)
        return lb

    def place(self, job: Job, s: float) -> object:
        """Start `job` at s; returns what `unplace` needs to undo it."""
        end = s + job.p
        if job.res == Res.IO:
            undo: object = self.io_free
            self.io_free = end
        elif job.res == Res.COMPUTE:
            undo = self.cmp_free
            self.cmp_free = end
        else:
            m = self.wk_free.index(min(self.wk_free))
            undo = (m, self.wk_free[m])
            self.wk_free[m] = end
        self.finish[job.id] = end
        self.left[job.res] -= job.p
        self.nleft[job.res] -= 1
        for c in self.succs[job.id]:
            self.npreds[c] -= 1
        self.placed += 1
        return undo

    def unplace(self, job: Job, undo: object) -> None:
        if job.res == Res.IO:
            self.io_free = undo  # type: ignore[assignment]
        elif job.res == Res.COMPUTE:
            self.cmp_free = undo  # type: ignore[assignment]
        else:
            m, f = undo  # type: ignore[misc]
            self.wk_free[m] = f
        self.finish[job.id] = None
        self.left[job.res] += job.p
        self.nleft[job.res] += 1
        for c in self.succs[job.id]:
            self.npreds[c] += 1
        self.placed -= 1

    def state(self, t: float) -> tuple:
        """What the rest of the search depends on (besides the makespan so far)."""
        live = tuple(f if f is None or any(self.finish[c] is None for c in self.succs[i]) else -1.0
                     for i, f in enumerate(self.finish))  # None: unplaced, -1: placed, no successor waits
        return (t, self.io_free, self.cmp_free, tuple(sorted(self.wk_free)), live)

    def dfs(self, t: float, span: float, last: int = -1) -> None:
        self.nodes += 1
        if self.placed == len(self.jobs):
            self.best = min(self.best, span)
            return
        if self.bound(t, span) >= self.best * (1 - 1e-12):
            return
        key = (self.state(t), last)
        if self.seen.get(key, math.inf) <= span:
            return  # the same subproblem was already searched from an equal or better prefix
        self.seen[key] = span
        cands = [(self.est(j, t), j) for j in self.eligible()]
        for s, j in sorted(cands, key=lambda c: (c[0], c[1].id)):
            if (s == t and j.id < last) or self._dominated(s, j, cands):
                continue  # same start as the previous job: only in id order (the other order is a twin)
            undo = self.place(j, s)
            self.dfs(s, max(span, s + j.p), j.id)
            self.unplace(j, undo)

    @staticmethod
    def _dominated(s: float, job: Job, cands: list[tuple[float, Job]]) -> bool:
        """Another eligible job of the same resource fits entirely before `job` would start."""
        # `so < s` is implied by `so + o.p <= s` in exact arithmetic; it keeps a tiny o.p absorbed by
        # rounding from dominating a job at its own start time (the id tie rule would then lose both)
        return any(o is not job and o.res == job.res and so + o.p <= s and so < s for so, o in cands)


def brute_force_optimum(tasks: Sequence[ExpertTask], workers: int, upper: float = math.inf) -> float:
    """The optimal makespan of `tasks` on 1 I/O channel, `workers` decode workers and 1 compute stream.

    `upper`: a known feasible makespan (prunes faster; the result is min(optimum, upper)).
    Raises ZipMoEError for instances with more than 24 positive-duration jobs.
    """
    if workers < 1:
        raise ZipMoEError(f"workers must be >= 1, got {workers}")
    jobs = build_jobs(tasks)
    if len(jobs) > _MAX_JOBS:
        raise ZipMoEError(f"brute force is for small instances: {len(jobs)} jobs > {_MAX_JOBS}; use schedule()")
    if not jobs:
        return 0.0
    search = _Search(jobs, workers, upper)
    search.dfs(0.0, 0.0)
    return search.best
