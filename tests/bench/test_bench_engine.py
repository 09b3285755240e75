"""bench/engine.py end to end on a shrunken Qwen-shaped model on CPU, so the device benchmark cannot rot
between device sessions: every requested row runs under one shared budget that does not hold every expert."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from zipmoe.bench import engine as bench
from zipmoe.models import compute
from zipmoe.models.compute import INDEX_COPY_MIN_SLOTS

# zipmoe-perslot-copy last: the run must reset the setting it changes for the forward
SYSTEMS = ("zipmoe", "zipmoe-fused", "zipmoe-4workers", "zipmoe-3io", "uncompressed-lru", "zipmoe-perslot-copy")


def test_engine_bench_runs_every_row_under_one_budget(tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--workdir", str(tmp_path / "w"), "--layers", "2", "--scale", "0.0625", "--device", "cpu",
                           "--workers", "2", "--big-batch", "2", "--big-batch-tokens", "2", "--new-tokens", "3",
                           "--prompt-len", "8", "--skip-reference", "--trace", "--json", str(out),
                           "--torch-threads", "1", "--runs", *(f"{s}:0.25" for s in SYSTEMS)]) == 0
    finally:
        torch.set_num_threads(threads)  # a process-wide setting: the rest of the suite keeps its own
    result = json.loads(out.read_text())
    assert result["torch_threads"] == 1  # recorded, so an A/B of thread counts reads from the JSON
    runs = {(r["system"], r["batch"]): r for r in result["runs"]}
    assert set(runs) == {(s, b) for s in SYSTEMS for b in (1, 2)}
    assert len({r["memory_budget"] for r in runs.values()}) == 1  # the same bytes for every system
    for (system, _batch), r in runs.items():
        assert r["bytes_read"] > 0, f"{system}: the budget held every expert; the row measures nothing"
        assert abs(sum(r["hit_rate"].values()) - 1) < 1e-9
        assert r["trace"]["layer_calls"] > 0 and r["trace"]["read_union_ms"] is not None  # every batch size
        assert r["tpot_s"] > 0 and r["decode_io_bound_s"] > 0
        assert r["merge"] == "workers"  # a CPU's default: the decode workers merge
    assert compute.INDEX_COPY_MIN_SLOTS == INDEX_COPY_MIN_SLOTS  # the perslot-copy row did not outlive its run
    for batch in (1, 2):  # compressed experts: more of them cached in the same bytes, fewer bytes per miss
        assert runs[("zipmoe", batch)]["bytes_read"] < runs[("uncompressed-lru", batch)]["bytes_read"]
        assert runs[("zipmoe", batch)]["hit_rate"]["C"] > runs[("uncompressed-lru", batch)]["hit_rate"]["F"]
