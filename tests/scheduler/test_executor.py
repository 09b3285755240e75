"""The executor with fake, sleep-free ops: every expert handed over once, stage order respected,
errors name the expert and leave the executor usable, and close() leaves no thread behind."""

from __future__ import annotations

import itertools
import os
import sys
import threading

import pytest

from zipmoe.errors import ChecksumError, ExpertTaskError, ZipMoEError
from zipmoe.scheduler.executor import Executor
from zipmoe.scheduler.schedule import schedule
from zipmoe.scheduler.tasks import MERGE, CostModel, DecodeStep, ExpertTask, Plan
from zipmoe.types import ExpertKey, State

STATES = [State.MISS, State.C, State.E, State.S, State.F, State.MISS, State.C, State.E, State.S]
WAIT = 10.0  # s; only a safety net against hangs, never reached when the code is right


def key(e: int) -> ExpertKey:
    return ExpertKey(2, e)


def make_plan(states: list[State] = STATES, merge: bool = True, workers: int = 3, k: int = 3) -> Plan:
    cm = CostModel(1e9, 1e-5, 1e9, 4e9 if merge else float("inf"), 1e-3)
    return schedule([cm.task(key(e), s, 100_000, 40_000, 100_000, k) for e, s in enumerate(states)], workers)


class RecordingOps:
    """Logs every op with a global sequence number; optionally fails one op."""

    def __init__(self, fail: tuple[str, ExpertKey] | None = None, exc: BaseException | None = None):
        self.log: list[tuple[int, str, ExpertKey, int]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self.fail, self.exc = fail, exc or OSError("disk on fire")

    def _op(self, name: str, k: ExpertKey, shard: int = 0) -> None:
        if self.fail == (name, k):
            raise self.exc
        with self._lock:
            self.log.append((next(self._seq), name, k, shard))

    def read_sm(self, k: ExpertKey) -> None:
        self._op("read_sm", k)

    def read_e(self, k: ExpertKey) -> None:
        self._op("read_e", k)

    def decode_shard(self, k: ExpertKey, shard: int) -> None:
        self._op("decode", k, shard)

    def merge(self, k: ExpertKey) -> None:
        self._op("merge", k)

    def when(self, name: str, k: ExpertKey) -> list[int]:
        return [seq for seq, n, kk, _ in self.log if n == name and kk == k]


def run_and_log(ex: Executor, plan: Plan, ops: RecordingOps) -> list[tuple[int, ExpertKey]]:
    got = []
    for k in ex.run(plan, ops):
        with ops._lock:
            got.append((next(ops._seq), k))
    return got


@pytest.mark.parametrize("merge", [True, False])
def test_every_expert_once_and_stages_in_order(merge: bool) -> None:
    plan = make_plan(merge=merge)
    ops = RecordingOps()
    with Executor(workers=3) as ex:
        for _ in range(3):  # the same threads serve layer after layer
            ops.log.clear()
            got = run_and_log(ex, plan, ops)
            assert sorted(k for _, k in got) == sorted(t.key for t in plan.tasks)
            handed = {k: seq for seq, k in got}
            for t in plan.tasks:
                decodes = ops.when("decode", t.key)
                assert len(decodes) == (t.k if t.decodes else 0)
                assert len(ops.when("read_e", t.key)) == int(t.reads_e)
                assert len(ops.when("read_sm", t.key)) == int(t.reads_sm)
                assert all(d > r for d in decodes for r in ops.when("read_e", t.key))  # decode after its read
                merges = ops.when("merge", t.key)
                assert len(merges) == int(t.decodes and merge)
                assert all(m > d for m in merges for d in decodes + ops.when("read_sm", t.key))
                inputs = decodes + merges + ops.when("read_sm", t.key) + ops.when("read_e", t.key)
                assert all(handed[t.key] > i for i in inputs)  # handed over only once ready


def test_reads_follow_the_plan_and_timings_are_recorded() -> None:
    plan = make_plan()
    ops = RecordingOps()
    with Executor(workers=2) as ex:
        handle = ex.run(plan, ops)
        keys = list(handle)
    reads = [(n, k) for _, n, k, _ in sorted(ops.log) if n.startswith("read")]
    assert reads == [("read_e" if s.plane.name == "E" else "read_sm", s.key) for s in plan.io_queue]
    tm = handle.timings
    assert tm is not None and [e.key for e in tm.experts] == keys
    assert 0 <= tm.stall_s <= tm.wall_s and 0 <= tm.stall_share <= 1
    assert tm.io_busy_s > 0 and tm.decode_busy_s > 0
    for e in tm.experts:
        assert e.ready <= e.compute_start <= tm.wall_s
        if e.decode_end == e.decode_end:  # not nan: decoded here
            assert e.decode_start <= e.decode_end <= e.ready


def test_type_two_decodes_overlap_a_read() -> None:
    """A C-state decode must run while the channel is still inside a read (no waiting for I/O)."""
    plan = make_plan([State.MISS, State.C], merge=False, workers=2, k=1)
    inside_read, decoded = threading.Event(), threading.Event()

    class Ops(RecordingOps):
        def read_e(self, k: ExpertKey) -> None:
            inside_read.set()
            assert decoded.wait(WAIT), "the C-state decode did not run during the read"

        def decode_shard(self, k: ExpertKey, shard: int) -> None:
            if k == key(1):
                assert inside_read.wait(WAIT)
                decoded.set()

    with Executor(workers=2) as ex:
        assert sorted(ex.run(plan, Ops())) == [key(0), key(1)]


@pytest.mark.parametrize(("op", "expert", "stage"), [
    ("read_e", 0, "reading the E plane of"), ("read_sm", 2, "reading the SM plane of"),
    ("decode", 1, "decoding exponent shard"), ("merge", 3, "merging"),
])
def test_errors_name_the_expert_and_leave_the_executor_usable(op: str, expert: int, stage: str) -> None:
    plan = make_plan()
    with Executor(workers=3) as ex:
        with pytest.raises(ExpertTaskError, match=f"{stage}.*layer 2 expert {expert}.*disk on fire") as err:
            list(ex.run(plan, RecordingOps(fail=(op, key(expert)))))
        assert err.value.key == key(expert) and isinstance(err.value.__cause__, OSError)
        ops = RecordingOps()
        assert len(run_and_log(ex, plan, ops)) == len(plan.tasks)  # next layer runs normally


def test_zipmoe_errors_pass_through_unchanged() -> None:
    plan = make_plan()
    bad = ChecksumError("checksum mismatch in layer 2 expert 0 chunk E[1]")
    with Executor(workers=2) as ex, pytest.raises(ChecksumError, match="chunk E\\[1\\]"):
        list(ex.run(plan, RecordingOps(fail=("read_e", key(0)), exc=bad)))


def test_no_op_runs_after_an_error_is_raised() -> None:
    plan = make_plan()

    class Ops(RecordingOps):
        def decode_shard(self, k: ExpertKey, shard: int) -> None:
            if k == key(1) and shard == 0:
                raise ValueError("corrupt shard")
            super().decode_shard(k, shard)

    ops = Ops()
    with Executor(workers=3) as ex:
        with pytest.raises(ExpertTaskError, match="layer 2 expert 1"):
            list(ex.run(plan, ops))
        n = len(ops.log)
        list(ex.run(make_plan([State.F]), RecordingOps()))  # a full round trip through the executor
        assert len(ops.log) == n, "an op of the failed run ran after the error reached the caller"


def test_breaking_out_cancels_and_drains() -> None:
    plan = make_plan()
    ops = RecordingOps()
    with Executor(workers=3) as ex:
        handle = ex.run(plan, ops)
        next(handle)
        handle.close()
        n = len(ops.log)
        assert handle.timings is not None and len(handle.timings.experts) == 1
        assert len(run_and_log(ex, plan, RecordingOps())) == len(plan.tasks)
        assert len(ops.log) == n


def test_callback_form_and_f_only_plans() -> None:
    seen: list[ExpertKey] = []
    with Executor(workers=1) as ex:
        tm = ex.run_all(make_plan([State.F, State.F, State.C]), RecordingOps(), seen.append)
    assert sorted(seen) == [key(0), key(1), key(2)] and len(tm.experts) == 3


def test_bad_plans_are_rejected_before_any_thread_waits() -> None:
    plan = make_plan([State.C], k=2)
    merge_first = Plan(plan.tasks, plan.workers, plan.io_queue,
                       (DecodeStep(key(0), MERGE), DecodeStep(key(0), 0), DecodeStep(key(0), 1)),
                       plan.compute_order, plan.predicted, plan.makespan_s, plan.lower_bound_s)
    missing = Plan(plan.tasks, plan.workers, plan.io_queue, (DecodeStep(key(0), 0),), plan.compute_order,
                   plan.predicted, plan.makespan_s, plan.lower_bound_s)
    with Executor(workers=1) as ex:
        for bad in (merge_first, missing):
            with pytest.raises(ZipMoEError, match="plan's"):
                ex.run(bad, RecordingOps())
    with pytest.raises(ZipMoEError, match="at least one"):
        Executor(workers=0)
    with pytest.raises(ZipMoEError, match="at least one I/O thread"):
        Executor(workers=1, io_threads=0)


def test_close_joins_every_thread() -> None:
    before = set(threading.enumerate())
    ex = Executor(workers=4, io_threads=3)
    assert len(set(threading.enumerate()) - before) == 7
    with pytest.raises(ExpertTaskError):
        list(ex.run(make_plan(), RecordingOps(fail=("decode", key(0)))))
    list(ex.run(make_plan(), RecordingOps()))
    ex.close()
    ex.close()  # idempotent
    assert set(threading.enumerate()) - before == set()
    with pytest.raises(ZipMoEError, match="closed"):
        ex.run(make_plan(), RecordingOps())


def test_f_task_in_plan_built_by_hand() -> None:
    t = ExpertTask(key(9), State.F, 0, 0, 0, 0, 1e-3, 0)
    with Executor(workers=1) as ex:
        assert list(ex.run(schedule([t], 1), RecordingOps())) == [key(9)]


def test_two_io_threads_keep_a_second_read_in_flight_and_claim_in_order() -> None:
    """The first read blocks until the second has started: only a channel with two reads in flight
    finishes this plan; reads are still claimed in io_queue order."""
    plan = make_plan([State.MISS, State.MISS, State.E, State.S])
    second_started = threading.Event()

    class OverlapOps(RecordingOps):
        def __init__(self) -> None:
            super().__init__()
            self.started: list[tuple[str, ExpertKey]] = []

        def _start(self, name: str, k: ExpertKey) -> None:
            with self._lock:
                self.started.append((name, k))
                n = len(self.started)
            if n == 2:
                second_started.set()
            if n == 1:
                assert second_started.wait(WAIT), "the second read never started while the first was in flight"

        def read_sm(self, k: ExpertKey) -> None:
            self._start("read_sm", k)
            super().read_sm(k)

        def read_e(self, k: ExpertKey) -> None:
            self._start("read_e", k)
            super().read_e(k)

    ops = OverlapOps()
    with Executor(workers=2, io_threads=2) as ex:
        got = [k for k in ex.run(plan, ops)]
    assert sorted(got) == sorted(t.key for t in plan.tasks)
    want = [("read_e" if s.plane.name == "E" else "read_sm", s.key) for s in plan.io_queue]
    assert sorted(ops.started) == sorted(want) and len(ops.started) == len(want)
    assert ops.started[0] == want[0]


class _SmWaitsForAShard:
    """LayerOps whose SM read ends only once a shard of the same expert has been decoded (or after 0.5 s)."""

    def __init__(self):
        self.shard_done = threading.Event()
        self.sm_done = threading.Event()
        self.shards_before_sm = False

    def read_e(self, key):
        pass

    def read_sm(self, key):
        self.shards_before_sm = self.shard_done.wait(0.5)
        self.sm_done.set()

    def decode_shard(self, key, shard):
        self.shard_done.set()

    def merge(self, key):
        raise AssertionError("no merge step is planned for these tasks")


@pytest.mark.parametrize("late_merge", [False, True])
def test_late_merged_shards_decode_while_the_sm_plane_is_read(late_merge):
    """late_merge: a MISS expert's shards need only its E shards, so they run during its SM read; it is
    handed over only when both are done. Fused, the shards wait for the SM read."""
    costs = CostModel(disk_bytes_per_s=1e9, disk_latency_s=0.0, decode_bytes_per_s=1e9, merge_bytes_per_s=1e9,
                      compute_s=1e-4)
    key = ExpertKey(0, 0)
    task = costs.task(key, State.MISS, 1000, 300, 1000, 2, fused=not late_merge, late_merge=late_merge)
    plan = schedule([task], 2, exact_times=False)
    ops = _SmWaitsForAShard()
    with Executor(2, io_threads=1) as ex, ex.run(plan, ops) as run:
        got = list(run)
        assert ops.sm_done.is_set(), "handed over before its SM read finished"
    assert got == [key]
    assert ops.shards_before_sm is late_merge


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a nice value per thread is Linux's")
@pytest.mark.parametrize("nice", [0, 5])
def test_decode_workers_run_at_the_lower_priority_asked_for_and_the_readers_do_not(nice: int) -> None:
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())  # what new threads inherit
    seen: dict[str, set[int]] = {}

    class PriorityOps(RecordingOps):
        def _op(self, name: str, k: ExpertKey, shard: int = 0) -> None:
            super()._op(name, k, shard)
            with self._lock:
                seen.setdefault(name, set()).add(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    with Executor(workers=2, decode_nice=nice) as ex:
        run_and_log(ex, make_plan(), PriorityOps())
    assert seen["decode"] == seen["merge"] == {min(19, base + nice)}
    assert seen["read_sm"] == seen["read_e"] == {base}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # the caller's is untouched
