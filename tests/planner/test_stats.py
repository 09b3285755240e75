"""RoutingStats: decayed counts, ranks, curves, drift; the statistics file; priors from real profiles."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from zipmoe.bench.routing import RoutingSampler
from zipmoe.errors import ZipMoEError
from zipmoe.planner.profile_io import load_stats, profile_curves, resample_curve, save_stats, store_fingerprint
from zipmoe.planner.stats import RankSnapshot, RoutingStats, batch_curves, rank_drift


def test_counts_ranks_and_curves():
    st = RoutingStats([3, 5], num_experts=6, decay=1.0)
    for _ in range(10):
        st.observe(3, [4, 1])
    for _ in range(5):
        st.observe(3, [4, 2])
    assert st.ranking(3)[:3].tolist() == [4, 1, 2]
    assert st.rank_of(3, 4) == 0 and st.rank_of(3, 2) == 2
    assert np.allclose(st.frequencies(3)[[4, 1, 2]], [1.0, 10 / 15, 5 / 15])
    snap = st.snapshot()
    assert np.allclose(snap.curve(3)[:3], [1.0, 10 / 15, 5 / 15]) and snap.curve(5).sum() == 0
    assert snap.observations[0] == pytest.approx(15)
    with pytest.raises(ZipMoEError, match="not an MoE layer"):
        st.observe(4, [0])


def test_decay_follows_drift():
    st = RoutingStats([0], num_experts=4, decay=0.9)
    for _ in range(50):
        st.observe(0, [0])
    for _ in range(30):
        st.observe(0, [3])
    assert st.rank_of(0, 3) == 0  # recent activity outranks older, larger totals
    assert st.observations(0) == pytest.approx(sum(0.9**i for i in range(80)), rel=1e-9)
    assert st.half_life() == pytest.approx(np.log(2) / -np.log(0.9))


def test_weight_renormalisation_keeps_frequencies():
    st = RoutingStats([0], num_experts=3, decay=0.5)  # weight passes 1e100 after ~330 calls
    for i in range(1000):
        st.observe(0, [i % 2])
    f = st.frequencies(0)
    assert np.all(np.isfinite(f)) and f[2] == 0 and f[1] == pytest.approx(2 / 3, rel=1e-6)


def test_drift_is_total_variation_of_shapes():
    a = RankSnapshot((0,), np.array([[0.5, 0.3, 0.2, 0.0]]), (1.0,))
    b = RankSnapshot((0,), np.array([[0.25, 0.25, 0.25, 0.25]]), (1.0,))
    assert rank_drift(a, a) == 0.0
    assert rank_drift(a, b) == pytest.approx(0.5 * (0.25 + 0.05 + 0.05 + 0.25))
    with pytest.raises(ZipMoEError):
        rank_drift(a, RankSnapshot((1,), a.curves, (1.0,)))


def test_profile_curves_resample_and_stretch():
    raw = profile_curves("qwen1.5-moe-a2.7b", 24, 60)
    assert raw.shape == (24, 60) and np.allclose(raw.sum(axis=1), 4, atol=1e-2)
    c = profile_curves("deepseek-v2-lite", 7, 16, top_k=2, kind="global")
    assert c.shape == (7, 16) and np.allclose(c.sum(axis=1), 2) and np.all(np.diff(c, axis=1) <= 1e-12)
    with pytest.raises(ZipMoEError, match="choose one of"):
        profile_curves("mixtral", 2, 8)


@pytest.mark.parametrize(("model", "experts", "top_k"), [("qwen1.5-moe-a2.7b", 8, 4),
                                                         ("deepseek-v2-lite", 6, 2), ("deepseek-v2-lite", 4, 3)])
def test_few_experts_cap_each_rank_at_one_and_keep_the_mass(model, experts, top_k):
    """Re-cut for few experts, the top ranks' shares exceed one activation per step; the excess moves down."""
    for kind in ("window", "global"):
        c = profile_curves(model, 5, experts, top_k=top_k, kind=kind)
        assert np.all(c <= 1.0) and np.allclose(c.sum(axis=1), top_k) and np.all(np.diff(c, axis=1) <= 1e-12)
    assert np.isclose(profile_curves(model, 9, experts, top_k=top_k).max(), 1.0)  # some layer hits the cap


def test_resample_curve_water_fills():
    skewed = np.array([0.9, 0.9, 0.1, 0.05, 0.05])  # shares 0.45, 0.45, ... → at k=3: 1.35, 1.35, 0.3, …
    c = resample_curve(skewed, 5, 3)
    assert np.allclose(c, [1, 1, 0.5, 0.25, 0.25]) and np.isclose(c.sum(), 3)
    flat = resample_curve(np.full(4, 0.5), 8, 2)  # nothing to cap: the plain re-cut
    assert np.allclose(flat, 0.25)
    assert np.allclose(resample_curve(skewed, 5, 5), 1.0)
    with pytest.raises(ZipMoEError, match="top_k"):
        resample_curve(skewed, 4, 5)


@pytest.fixture
def fake_store(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "zipmoe.json").write_text('{"pretend": "manifest"}')
    return store


def _stats() -> RoutingStats:
    st = RoutingStats([1, 2], num_experts=5, decay=0.99)
    rng = np.random.default_rng(0)
    for _ in range(40):
        for layer in (1, 2):
            st.observe(layer, rng.choice(5, size=2, replace=False))
    return st


def test_stats_file_round_trip(tmp_path, fake_store):
    st, fp = _stats(), store_fingerprint(fake_store)
    path = tmp_path / "s.json"
    assert save_stats(st, path, fp)
    back = load_stats(path, fp, [1, 2], 5, decay=0.99)
    assert back is not None
    assert np.allclose(back.snapshot().curves, st.snapshot().curves)
    assert back.ranking(1).tolist() == st.ranking(1).tolist()
    st.observe(1, [4]), back.observe(1, [4])  # the restored scale continues identically
    assert np.allclose(back.frequencies(1), st.frequencies(1))


def test_stats_of_another_batch_size_are_set_aside(tmp_path, fake_store, caplog):
    """A batch-16 server's statistics count 16 requests' unions per call: a batch-1 plan must not use them."""
    st, fp, path = _stats(), store_fingerprint(fake_store), tmp_path / "s.json"
    assert save_stats(st, path, fp, batch=16)
    assert load_stats(path, fp, [1, 2], 5, decay=0.99, batch=16) is not None
    with caplog.at_level(logging.INFO, logger="zipmoe.planner.profile_io"):
        assert load_stats(path, fp, [1, 2], 5, decay=0.99) is None
    assert "observed at batch 16, planning for batch 1" in caplog.text
    from zipmoe.planner import profile_io

    _edit(path, lambda d: (d["body"].pop("batch"), d.__setitem__("checksum", profile_io._checksum(d["body"]))))
    assert load_stats(path, fp, [1, 2], 5, decay=0.99) is not None  # files from before the field: batch 1


def _edit(path, fn):
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("case", ["garbage", "checksum", "version", "other_store", "shape", "resealed_bad",
                                  "bad_batch"])
def test_stale_or_corrupt_stats_are_ignored_with_a_warning(tmp_path, fake_store, caplog, case):
    fp, path = store_fingerprint(fake_store), tmp_path / "s.json"
    save_stats(_stats(), path, fp)
    layers = [1, 2]
    if case == "garbage":
        path.write_bytes(b"\x00not json")
    elif case == "checksum":
        _edit(path, lambda d: d["body"]["counts"][0].__setitem__(0, 7.0))
    elif case == "version":
        from zipmoe.planner import profile_io

        _edit(path, lambda d: (d["body"].__setitem__("version", 99),
                               d.__setitem__("checksum", profile_io._checksum(d["body"]))))
    elif case == "other_store":
        fp = "0" * 16
    elif case == "shape":
        layers = [1, 2, 3]
    elif case == "bad_batch":
        from zipmoe.planner import profile_io

        _edit(path, lambda d: (d["body"].__setitem__("batch", 0),
                               d.__setitem__("checksum", profile_io._checksum(d["body"]))))
    else:  # a consistent checksum over impossible numbers is still refused
        from zipmoe.planner import profile_io

        _edit(path, lambda d: (d["body"]["counts"][0].__setitem__(0, 1e9),
                               d.__setitem__("checksum", profile_io._checksum(d["body"]))))
    with caplog.at_level(logging.WARNING, logger="zipmoe.planner.profile_io"):
        assert load_stats(path, fp, layers, 5) is None
    assert "ignoring routing statistics" in caplog.text


def test_missing_stats_file_is_silent(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert load_stats(tmp_path / "none.json", "x", [0], 4) is None
    assert not caplog.records


def test_seed_from_prior_then_observations_take_over():
    st = RoutingStats([0], num_experts=4, decay=0.9)
    st.seed(0, np.array([0.9, 0.6, 0.4, 0.1]), weight=10)
    assert st.rank_of(0, 0) == 0 and np.allclose(st.snapshot().curves[0], [0.9, 0.6, 0.4, 0.1])
    for _ in range(60):
        st.observe(0, [3, 2])
    assert {st.rank_of(0, 3), st.rank_of(0, 2)} == {0, 1}


def test_planner_imports_neither_torch_nor_the_engine():
    import subprocess
    import sys

    code = ("import sys, zipmoe.planner, zipmoe.planner.admission, zipmoe.planner.cost_model, "
            "zipmoe.planner.profile_io; bad = [m for m in sys.modules if m == 'torch' or "
            "m.startswith(('zipmoe.engine', 'zipmoe.models', 'zipmoe.cache'))]; print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("batch", [4, 16])
def test_batch_curves_give_the_experts_a_batch_of_requests_needs(batch):
    """The union of `batch` independent requests' experts per layer call, checked against the benchmark's
    calibrated sampler itself (each request its own permutation, top-k drawn without replacement)."""
    sampler = RoutingSampler("qwen1.5-moe-a2.7b", 60, 4, 1, seed=3)
    curves = sampler.rank_probs()
    union = batch_curves(curves, batch)
    sizes = []
    for _ in range(300):
        requests = [sampler.new_request() for _ in range(batch)]
        sizes.append(len({int(e) for r in requests for e in r.step(0, 1).ravel()}))
    sem = np.std(sizes) / np.sqrt(len(sizes))
    assert abs(union.sum() - np.mean(sizes)) < 4 * sem + 0.05
    assert np.all(np.diff(union[0]) <= 1e-12) and np.all((union >= 0) & (union <= 1))
    assert union[0, 0] > curves[0, 0] and union[0, -1] > curves[0, -1]  # every rank gets busier
    assert np.array_equal(batch_curves(curves, 1), curves)


def test_batch_curves_reject_bad_arguments():
    with pytest.raises(ZipMoEError, match="batch"):
        batch_curves(np.full((1, 8), 0.5), 0)
