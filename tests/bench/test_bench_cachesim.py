"""bench/cachesim.py: the real ExpertCache driven by the calibrated sampler, hit rates as counts."""

from __future__ import annotations

from zipmoe.bench.cachesim import ceilings, main, simulate


def test_simulation_is_deterministic_and_shows_the_cycle_that_lru_thrashes():
    kw = dict(new_tokens=24, requests=3, experts=16, top_k=2, layers=3)
    lru_b1, lrfu_b1 = simulate("lru", 12, 1, **kw), simulate("lrfu", 12, 1, **kw)
    assert lru_b1 == simulate("lru", 12, 1, **kw)  # seeded: the same counts every run
    assert 0.0 < lru_b1 < 1.0 and 0.0 < lrfu_b1 < 1.0
    # batch 8 needs nearly every expert of every layer each step: a shared LRU pool smaller than the
    # working set evicts exactly what the next layers need; LRFU's admission filter keeps a subset
    assert simulate("lru", 12, 8, **kw) == 0.0
    assert simulate("lrfu", 12, 8, **kw) > 0.1


def test_cli_prints_one_json_row_per_combination(capsys):
    main(["--capacity", "20", "--batch", "1", "--policies", "lru", "lrfu-per-access", "--experts", "16",
          "--top-k", "2", "--layers", "2", "--new-tokens", "4", "--requests", "1"])
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 2 and all('"decode_hit_rate"' in r for r in rows)


def test_the_ceilings_bound_every_policy_and_grow_with_the_cache():
    kw = dict(new_tokens=24, requests=3, experts=16, top_k=2, layers=3)
    small, large = ceilings(12, **kw), ceilings(30, **kw)
    for policy in ("lru", "lrfu"):  # the oracle keeps the most likely experts: no online policy beats it
        assert simulate(policy, 12, 1, **kw) <= small["oracle"] + 0.02
    assert 0.0 < small["request-counts"] < small["oracle"] < large["oracle"] < 1.0
    assert large["request-counts"] > small["request-counts"]
