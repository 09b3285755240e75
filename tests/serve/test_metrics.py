"""/metrics content: request histograms and the engine's cache counters, as valid Prometheus text."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from zipmoe.serve.metrics import ServerMetrics


def samples(metrics: ServerMetrics) -> dict[tuple[str, tuple], float]:
    text = metrics.render().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_engine_counters_exported_per_state():
    stats = {"hits": {"F": 10, "C": 4, "S": 2, "E": 1, "MISS": 3}, "bytes_read": 12345,
             "io_stall_share": 0.25}
    got = samples(ServerMetrics(lambda: stats))
    assert got[("zipmoe_expert_hits_total", (("state", "C"),))] == 4
    assert got[("zipmoe_expert_hits_total", (("state", "MISS"),))] == 3
    assert got[("zipmoe_store_read_bytes_total", ())] == 12345
    assert got[("zipmoe_io_stall_share", ())] == 0.25


def test_request_metrics_and_failing_stats_do_not_break_scrapes():
    def broken() -> dict:
        raise RuntimeError("engine gone")

    m = ServerMetrics(broken)
    m.record_finished("completed", prompt_tokens=7, completion_tokens=5, ttft_s=0.03, tpot_s=0.01)
    m.record_finished("cancelled", prompt_tokens=3, completion_tokens=0, ttft_s=0.0, tpot_s=0.0)
    got = samples(m)
    assert got[("zipmoe_requests_total", (("outcome", "completed"),))] == 1
    assert got[("zipmoe_requests_total", (("outcome", "cancelled"),))] == 1
    assert got[("zipmoe_prompt_tokens_total", ())] == 10
    assert got[("zipmoe_time_to_first_token_seconds_count", ())] == 1  # no first token, no TTFT sample
    assert got[("zipmoe_time_per_output_token_seconds_bucket", (("le", "0.01"),))] == 1
    assert not any(name.startswith("zipmoe_expert_hits") for name, _ in got)


def test_plain_model_has_no_engine_metrics():
    assert not any(name.startswith("zipmoe_expert") for name, _ in samples(ServerMetrics(None)))
