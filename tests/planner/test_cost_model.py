"""profile_machine: measures on a real (tiny) store, caches per machine, re-measures when stale."""

from __future__ import annotations

import json
import logging
import math

import pytest

from tests.store.store_helpers import build_store, fake_experts
from zipmoe.planner.cost_model import MachineProfile, profile_machine
from zipmoe.scheduler.tasks import CostModel


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("cm") / "store", fake_experts(raw_layer=False))


class Probe:
    def __init__(self, value: float = 2e-3):
        self.calls, self.value = 0, value

    def __call__(self) -> float:
        self.calls += 1
        return self.value


def test_measures_every_rate_and_caches_it(store, tmp_path):
    cache, probe = tmp_path / "profile.json", Probe()
    prof = profile_machine(store, "cpu", compute_s=probe, cache=cache)
    assert probe.calls == 1 and prof.compute_s == 2e-3
    for rate in (prof.disk_bytes_per_s, prof.decode_bytes_per_s, prof.merge_bytes_per_s):
        assert math.isfinite(rate) and rate > 0
    assert 0 < prof.disk_latency_s < 1
    assert isinstance(prof.cost_model(), CostModel) and "GB/s" in prof.describe()
    again = profile_machine(store, "cpu", compute_s=probe, cache=cache)
    assert probe.calls == 1 and again == prof  # fresh cache entry: nothing measured
    other = profile_machine(store, "cuda:0", compute_s=probe, cache=cache)
    assert probe.calls == 2 and other.device == "cuda:0"  # keyed by device too
    striped = profile_machine(store, "cpu", compute_s=probe, cache=cache, read_stripes=2)
    assert probe.calls == 3 and striped.disk_bytes_per_s > 0  # and by how the engine reads
    assert len(json.loads(cache.read_text())) == 3


def test_stale_entries_are_measured_again(store, tmp_path):
    cache, probe = tmp_path / "profile.json", Probe()
    first = profile_machine(store, "cpu", compute_s=probe, cache=cache)
    doc = json.loads(cache.read_text())
    (entry,) = doc.values()
    entry["fingerprint"] = "another store"
    cache.write_text(json.dumps(doc))
    assert profile_machine(store, "cpu", compute_s=probe, cache=cache).measured_at > first.measured_at
    assert probe.calls == 2
    profile_machine(store, "cpu", compute_s=probe, cache=cache, max_age_s=0.0)  # too old
    profile_machine(store, "cpu", compute_s=probe, cache=cache, force=True)
    assert probe.calls == 4


def test_corrupt_cache_is_ignored_with_a_warning(store, tmp_path, caplog):
    cache = tmp_path / "profile.json"
    cache.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="zipmoe.planner.cost_model"):
        prof = profile_machine(store, "cpu", compute_s=1e-3, cache=cache)
    assert "ignoring unreadable machine profile" in caplog.text
    assert isinstance(prof, MachineProfile) and prof.compute_s == 1e-3
    doc = json.loads(cache.read_text())  # rewritten whole
    (entry,) = doc.values()
    entry["disk_bytes_per_s"] = -5.0  # an invalid rate is never trusted
    cache.write_text(json.dumps(doc))
    assert profile_machine(store, "cpu", cache=cache).disk_bytes_per_s > 0


def test_a_number_overrides_the_cached_compute_time(store, tmp_path):
    cache = tmp_path / "profile.json"
    profile_machine(store, "cpu", compute_s=Probe(5e-3), cache=cache)
    assert profile_machine(store, "cpu", compute_s=7e-4, cache=cache).compute_s == 7e-4
    assert profile_machine(store, "cpu", cache=cache).compute_s == 5e-3


def test_store_geometry_matches_the_cache_entry_sizes(store):
    from zipmoe.cache.pools import entry_bytes
    from zipmoe.planner.cost_model import store_geometry
    from zipmoe.store.reader import StoreReader
    from zipmoe.types import State

    with StoreReader(store) as reader:
        geom = store_geometry(reader)
        numel = next(iter(reader.entries.values())).numel
        per = entry_bytes(numel, reader.max_e_region_bytes)
    assert geom.numel == numel and geom.k == 4
    assert geom.entry_bytes == (per[State.F], per[State.C], per[State.S], per[State.E])
