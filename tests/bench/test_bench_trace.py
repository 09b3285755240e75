"""trace_summary: where a decode step's time went, from the engine's per-layer trace."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
from pathlib import Path

import pytest

from zipmoe.bench.metrics import trace_summary
from zipmoe.engine.engine import LayerTrace
from zipmoe.scheduler.tasks import ExpertTimes, PlanTimings
from zipmoe.types import ExpertKey

NAN = math.nan


def _layer(layer: int, entered: float, left: float, reads: list[tuple[float, float]], started: float,
           read_bytes: int = 0, sync_wait_s: float | None = None,
           forward: tuple[float, float] | None = None) -> LayerTrace:
    experts = tuple(ExpertTimes(ExpertKey(layer, e), a, b, NAN, NAN, NAN, NAN, NAN) for e, (a, b) in enumerate(reads))
    cached = ExpertTimes(ExpertKey(layer, 9), *([NAN] * 7))  # an expert with no read
    run = PlanTimings(left - started, 0.0, 0.0, 0.0, (*experts, cached), started)
    return LayerTrace(layer, entered, left, 0, (run,), read_bytes, sync_wait_s, *(forward or (None, None)))


def test_trace_summary_splits_a_step_into_reads_gaps_and_tails():
    prefill = [_layer(0, 0.0, 1.0, [(0.0, 0.5)], 0.0), _layer(1, 1.1, 2.0, [(0.0, 0.5)], 1.1)]
    # decode step: layer 0 enters at 3.0, plans until 3.001, reads 3.001–3.011 and 3.005–3.015 (overlapping),
    # ends at 3.020; layer 1 enters 3.025, no reads (all cached), ends 3.030
    step = [_layer(0, 3.0, 3.020, [(0.001, 0.011), (0.005, 0.015)], 3.0), _layer(1, 3.025, 3.030, [], 3.025)]
    out = trace_summary(prefill + step, layers_per_step=2)
    assert out["layer_calls"] == 2
    assert out["read_union_ms_sum_per_step"] == pytest.approx(14.0)  # 3.001–3.015, the overlap counted once
    assert out["before_first_read_ms"] == pytest.approx(1.0)
    assert out["after_last_read_ms"] == pytest.approx(5.0)
    assert out["between_layers_ms_sum_per_step"] == pytest.approx((3.0 - 2.0 + 0.005) * 1e3)
    assert out["reads_sum_per_step"] == pytest.approx(2.0)


def test_trace_summary_counts_prefetch_reads_into_disk_busy_time():
    prefill = [_layer(0, 0.0, 1.0, [(0.0, 0.5)], 0.0), _layer(1, 1.1, 2.0, [(0.0, 0.5)], 1.1)]
    # the step runs from the last prefill layer's end (2.0) to 3.0; the layers read 2.1–2.3, the
    # prefetcher 2.25–2.45 and 2.9–3.2 (clipped at 3.0) and 1.5–1.9 (before the step: not counted)
    step = [_layer(0, 2.05, 2.5, [(0.05, 0.25)], 2.05, read_bytes=700), _layer(1, 2.6, 3.0, [], 2.6)]
    prefetch = [(1.5, 1.9, 10_000), (2.25, 2.45, 200), (2.9, 3.2, 5_000)]
    out = trace_summary(prefill + step, layers_per_step=2, prefetch_spans=prefetch)
    assert out["disk_busy_share"] == pytest.approx((0.35 + 0.1) / 1.0)  # 2.1–2.45 and 2.9–3.0
    assert out["prefetch_union_ms_sum_per_step"] == pytest.approx(300.0)  # 0.2 + 0.1 s in one step
    # 700 B of the layer's reads + 200 B of the prefetch read that ended in the step, over 0.45 s busy
    assert out["read_gb_per_s_in_flight"] == pytest.approx(900 / 0.45 / 1e9)
    alone = trace_summary(prefill + step, layers_per_step=2)
    assert alone["disk_busy_share"] == pytest.approx(0.2) and alone["read_gb_per_s_in_flight"] == pytest.approx(
        700 / 0.2 / 1e9)


def test_trace_summary_splits_the_gaps_into_device_wait_and_host_time():
    prefill = [_layer(0, 0.0, 1.0, [(0.0, 0.5)], 0.0), _layer(1, 1.1, 2.0, [(0.0, 0.5)], 1.1)]
    # gaps of 6 and 4 ms before the step's layers, of which the routing syncs blocked 1 and 3 ms
    step = [_layer(0, 2.006, 2.1, [], 2.006, sync_wait_s=0.001), _layer(1, 2.104, 2.2, [], 2.104, sync_wait_s=0.003)]
    out = trace_summary(prefill + step, layers_per_step=2)
    assert out["sync_wait_ms_sum_per_step"] == pytest.approx(4.0)
    assert out["between_layers_host_ms_sum_per_step"] == pytest.approx(6.0)
    assert out["between_layers_ms_sum_per_step"] == pytest.approx(10.0)
    untimed = trace_summary([*prefill, _layer(0, 2.006, 2.1, [], 2.006)], layers_per_step=1)
    assert untimed["sync_wait_ms"] is None and untimed["sync_wait_ms_sum_per_step"] is None  # untimed: none


def test_trace_summary_splits_the_gaps_by_whose_code_ran():
    prefill = [_layer(0, 0.0, 1.0, [(0.0, 0.5)], 0.0), _layer(1, 1.1, 2.0, [(0.0, 0.5)], 1.1)]
    # layer 0's forward returned 1 ms after its loads (2.001), the model ran until layer 1's forward at 2.004,
    # which asked for experts at 2.006; then 2.2 → 2.203 → 2.2035 → 2.204 for the next
    step = [_layer(0, 2.006, 2.2, [], 2.006, forward=(2.004, 2.001)),
            _layer(1, 2.204, 2.3, [], 2.204, forward=(2.2035, 2.203))]
    out = trace_summary(prefill + step, layers_per_step=2)
    assert out["experts_tail_ms_sum_per_step"] == pytest.approx(4.0)
    assert out["model_between_ms_sum_per_step"] == pytest.approx(3.5)
    assert out["experts_head_ms_sum_per_step"] == pytest.approx(2.5)
    assert out["between_layers_ms_sum_per_step"] == pytest.approx(10.0)  # the three parts make the gap
    # marks out of order (not this step's forwards: a stale value) are not used
    stale = trace_summary([*prefill, _layer(0, 2.006, 2.2, [], 2.006, forward=(2.004, 1.5))], layers_per_step=1)
    assert stale["experts_tail_ms"] is None


def _timeline_tool():
    """scripts/timeline_gaps.py, imported from its path (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "timeline_gaps", Path(__file__).resolve().parents[2] / "scripts" / "timeline_gaps.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_timeline_gaps_splits_each_layer_into_op_time_and_the_rest(tmp_path):
    """scripts/timeline_gaps.py on a timeline of two threads: nested ops count once, the other thread not."""
    tool = _timeline_tool()
    events = []
    for layer in range(3):  # layer windows of 1000 µs: attention 100 µs, a linear of 200 µs holding a nested mm
        t = layer * 1000
        events += [{"ph": "X", "cat": "cpu_op", "tid": 1, "name": "aten::scaled_dot_product_attention", "ts": t,
                    "dur": 100},
                   {"ph": "X", "cat": "cpu_op", "tid": 1, "name": "aten::linear", "ts": t + 300, "dur": 200},
                   {"ph": "X", "cat": "cpu_op", "tid": 1, "name": "aten::mm", "ts": t + 310, "dur": 150}]
    events.append({"ph": "X", "cat": "cpu_op", "tid": 2, "name": "aten::copy_", "ts": 0, "dur": 5000})  # a worker
    events.append({"ph": "X", "cat": "cpu_op", "tid": 1, "name": "aten::scaled_dot_product_attention",
                   "ts": 3000, "dur": 100})
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    out = tool.summarize(str(path), count=2)
    assert out["layers"] == 2 and out["ops_per_layer"] == 2
    assert out["wall_ms"] == pytest.approx(1.0) and out["in_ops_ms"] == pytest.approx(0.3)  # to the next attention
    assert out["outside_ops_ms"] == pytest.approx(0.7)
    assert dict(out["top_ops_ms"])["aten::linear"] == pytest.approx(0.2) and "aten::mm" not in dict(out["top_ops_ms"])


def test_timeline_compare_gives_per_call_medians_of_what_both_ran(tmp_path):
    """--compare: the same op or kernel, one call's median duration in each timeline and their ratio."""
    tool = _timeline_tool()
    paths = []
    for name, scale in (("ours", 2.0), ("ref", 1.0)):
        events = []
        for i in range(3):
            t = i * 1000
            events += [{"ph": "X", "cat": "cpu_op", "tid": 1, "name": "aten::scaled_dot_product_attention",
                        "ts": t, "dur": 50 * scale},
                       {"ph": "X", "cat": "cpu_op", "tid": 1, "name": "aten::mul", "ts": t + 100, "dur": 10 * scale},
                       {"ph": "X", "cat": "kernel", "tid": 7, "name": "flash_fprop", "ts": t + 60, "dur": 4.0 + i}]
        if name == "ours":
            events.append({"ph": "X", "cat": "cpu_op", "tid": 1, "name": "aten::only_ours", "ts": 5000, "dur": 1})
        path = tmp_path / f"{name}.json.gz"
        with gzip.open(path, "wt") as f:
            json.dump({"traceEvents": events}, f)
        paths.append(str(path))
    rows = {(kind, n): (x, y, r) for kind, n, x, y, r in tool.compare(*paths)}
    assert set(rows) == {("op", "aten::scaled_dot_product_attention"), ("op", "aten::mul"), ("kernel", "flash_fprop")}
    assert rows[("op", "aten::mul")] == (20.0, 10.0, 2.0)
    assert rows[("kernel", "flash_fprop")] == (5.0, 5.0, 1.0)  # the median of 4, 5, 6 in both
