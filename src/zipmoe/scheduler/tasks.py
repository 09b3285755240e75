"""Plain data of the scheduler: one layer's expert tasks, the cost model that prices them, the Plan
the pure scheduler returns and the PlanTimings the executor records while running it.

Arrow: cache lookup (states) + CostModel ──▶ ExpertTask ──schedule()──▶ Plan ──Executor──▶ PlanTimings.
No threads, no torch; every object here is frozen and safe to hand between threads.

# E=experts in the layer K=exponent shards per expert W=decode workers; sizes in bytes, times in s
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from zipmoe.errors import ZipMoEError
from zipmoe.types import ExpertKey, State


class Plane(enum.IntEnum):
    """Which stored plane an I/O step reads."""

    E = 0  # the K compressed exponent shards (read first for MISS: decode can start on them)
    SM = 1  # the raw sign+mantissa plane (one byte per weight)


@dataclass(frozen=True, slots=True)
class ExpertTask:
    """The work one needed expert still costs, given the state the cache holds it in.

    F: compute only. C: K decode jobs → merge → compute. S: read E → decode → merge → compute.
    E: read SM ‖ decode (independent) → merge → compute. MISS: read E → decode, read SM; both → merge →
    compute. With merge_s = 0 the shards merge in place (fused), so an E or MISS task's shards wait for
    both reads and there is no merge job (the engine runs every state fused: a K-way parallel tail
    instead of one worker's merge). Type-I (E, MISS) needs the I/O channel for SM; Type-II (C, S) is
    mostly decode work.
    """

    key: ExpertKey  # which expert
    state: State  # how the cache holds it now
    read_sm_s: float  # s of I/O channel time to read the SM plane (0 unless state is E or MISS)
    read_e_s: float  # s of I/O channel time to read the compressed E shards (0 unless S or MISS)
    decode_s: float  # s of CPU time to decode all K shards (one worker each: K jobs of decode_s / k)
    merge_s: float  # s of one worker to merge SM + E into BF16 (0 when decode_shard merges in place)
    compute_s: float  # s of the compute stream for this expert's FFN
    k: int  # exponent shards = parallel decode jobs (>= 1 unless state is F)
    late_merge: bool = False  # shards decode exponents only (they need no SM plane) and the compute side
    #                           merges once shards and SM are in: an E/MISS expert decodes during its SM read

    def __post_init__(self) -> None:
        times = (self.read_sm_s, self.read_e_s, self.decode_s, self.merge_s, self.compute_s)
        if not all(math.isfinite(t) and t >= 0 for t in times):
            raise ZipMoEError(f"task for {self.key}: times must be finite and >= 0, got {times}")
        if self.state != State.F and self.k < 1:
            raise ZipMoEError(f"task for {self.key}: a {self.state.name} expert needs k >= 1 shards")
        reads_sm, reads_e = self.state in (State.E, State.MISS), self.state in (State.S, State.MISS)
        if (self.read_sm_s > 0 and not reads_sm) or (self.read_e_s > 0 and not reads_e):
            raise ZipMoEError(f"task for {self.key}: state {self.state.name} reads no such plane from disk")
        if self.state == State.F and (self.decode_s or self.merge_s):
            raise ZipMoEError(f"task for {self.key}: an F expert is already decoded")
        if self.late_merge and self.merge_s:
            raise ZipMoEError(f"task for {self.key}: a late merge runs on the compute side, not as a merge job")

    @property
    def shards_need_sm(self) -> bool:
        """Each shard merges in place (no merge job, no late merge), so it waits for the SM plane too."""
        return self.merge_s == 0 and not self.late_merge

    @property
    def reads_sm(self) -> bool:
        """Needs an SM read on the I/O channel (Type-I)."""
        return self.state in (State.E, State.MISS)

    @property
    def reads_e(self) -> bool:
        """Needs an E read on the I/O channel; its decode waits for that read."""
        return self.state in (State.S, State.MISS)

    @property
    def decodes(self) -> bool:
        """Has shard decode (and merge) jobs at all."""
        return self.state != State.F


@dataclass(frozen=True, slots=True)
class CostModel:
    """Profiled rates that turn plane sizes into task times (from the planner or a calibration run)."""

    disk_bytes_per_s: float  # B/s sustained read bandwidth of the I/O channel
    disk_latency_s: float  # s fixed cost per read request
    decode_bytes_per_s: float  # exponent-plane bytes (= weights) decoded per s by ONE worker
    merge_bytes_per_s: float  # BF16 bytes produced per s by a merge (math.inf: fused into decode)
    compute_s: float  # s of compute-stream time per expert

    def __post_init__(self) -> None:
        rates = (self.disk_bytes_per_s, self.decode_bytes_per_s, self.merge_bytes_per_s)
        if not all(r > 0 for r in rates) or self.disk_latency_s < 0 or self.compute_s < 0:
            raise ZipMoEError(f"cost model needs positive rates and non-negative times, got {self}")

    def task(self, key: ExpertKey, state: State, sm_bytes: int, e_bytes: int, numel: int, k: int,
             fused: bool = False, late_merge: bool = False) -> ExpertTask:
        """Price one expert held in `state`; sm_bytes/e_bytes are stored plane sizes, numel its weights.

        fused=True: decode_shard merges in place (SM already in memory), so merge_s = 0, the plan has no
        merge step and the expert is ready when its last shard lands. late_merge=True: no merge job either,
        the shards decode exponents only and the expert is ready when they and its SM plane are in (the
        merge is the compute side's, priced as nothing: a few elementwise kernels on a GPU).
        """
        read_sm = self.disk_latency_s + sm_bytes / self.disk_bytes_per_s if state in (State.E, State.MISS) else 0.0
        read_e = self.disk_latency_s + e_bytes / self.disk_bytes_per_s if state in (State.S, State.MISS) else 0.0
        decoded = state != State.F
        return ExpertTask(
            key=key,
            state=state,
            read_sm_s=read_sm,
            read_e_s=read_e,
            decode_s=numel / self.decode_bytes_per_s if decoded else 0.0,
            merge_s=2 * numel / self.merge_bytes_per_s if decoded and not (fused or late_merge) else 0.0,
            compute_s=self.compute_s,
            k=k if decoded else 0,
            late_merge=late_merge and decoded,
        )


@dataclass(frozen=True, slots=True)
class IoStep:
    """One read on the I/O channel."""

    key: ExpertKey  # whose plane
    plane: Plane  # which plane


MERGE = -1  # DecodeStep.shard of an expert's merge step


@dataclass(frozen=True, slots=True)
class DecodeStep:
    """One job for the decode workers: a shard decode, or the expert's merge (shard == MERGE)."""

    key: ExpertKey  # whose planes
    shard: int  # exponent shard index in [0, k), or MERGE


@dataclass(frozen=True, slots=True)
class ExpertTimes:
    """Stage times of one expert, in s from the start of the layer; math.nan where a stage is absent."""

    key: ExpertKey  # which expert
    io_start: float  # first read of this expert starts
    io_end: float  # last read of this expert ends
    decode_start: float  # first shard decode starts
    decode_end: float  # merge ends (weights ready in BF16)
    ready: float  # weights handed to the compute stream (F: 0)
    compute_start: float  # compute starts (predicted; for recorded runs: when the caller got the key)
    compute_end: float  # compute ends (predicted; nan in recorded runs: the caller owns compute)


@dataclass(frozen=True, slots=True)
class Plan:
    """What the executor runs for one layer: one queue per resource plus the predicted timeline."""

    tasks: tuple[ExpertTask, ...]  # the layer's tasks, in the order given to schedule()
    workers: int  # W decode workers the plan was made for
    io_queue: tuple[IoStep, ...]  # reads in channel order, back to back (the channel never idles)
    decode_queue: tuple[DecodeStep, ...]  # every shard + merge; a free worker takes the next one and
    #                                       waits for its inputs (planned idling), see schedule.py
    compute_order: tuple[ExpertKey, ...]  # predicted order in which experts become ready and are computed
    predicted: tuple[ExpertTimes, ...]  # predicted stage times per expert, same order as `tasks`
    makespan_s: float  # predicted s from layer start to the last compute end
    lower_bound_s: float  # s no schedule of these tasks can beat (lower_bound())

    @property
    def certified_ratio(self) -> float:
        """makespan / lower bound: an upper bound on makespan / optimum (1.0 for an empty layer)."""
        return self.makespan_s / self.lower_bound_s if self.lower_bound_s > 0 else 1.0


@dataclass(frozen=True, slots=True)
class PlanTimings:
    """What one executor run measured; wall-clock s from the start of `Executor.run`."""

    wall_s: float  # s from run start until the caller asked past the last expert (or the failure)
    io_busy_s: float  # s spent inside read_sm / read_e, summed over the I/O threads
    decode_busy_s: float  # summed s workers spent inside decode_shard + merge
    stall_s: float  # s the caller (compute stream) waited for the next ready expert
    experts: tuple[ExpertTimes, ...]  # per expert, in the order they were handed over
    started_at: float = math.nan  # time.perf_counter() when the run started (relates runs to each other)

    @property
    def stall_share(self) -> float:
        """Share of the layer's wall time the compute stream sat waiting for weights."""
        return self.stall_s / self.wall_s if self.wall_s > 0 else 0.0
