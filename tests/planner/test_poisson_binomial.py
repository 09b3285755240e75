"""The Poisson-binomial DP against brute force and Monte-Carlo sampling of the same rank model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from zipmoe.errors import ZipMoEError
from zipmoe.planner.poisson_binomial import joint_hits, pmf, range_pmfs, split_bounds
from zipmoe.planner.profile_io import profile_curves


def brute_pmf(p: np.ndarray) -> np.ndarray:
    out = np.zeros(len(p) + 1)
    for bits in itertools.product((0, 1), repeat=len(p)):
        out[sum(bits)] += np.prod([q if b else 1 - q for q, b in zip(p, bits, strict=True)])
    return out


@pytest.mark.parametrize("seed", range(5))
def test_pmf_equals_brute_force(seed):
    p = np.random.default_rng(seed).uniform(0, 1, size=9)
    assert np.allclose(pmf(p), brute_pmf(p), atol=1e-14)


def test_pmf_edge_cases():
    assert np.array_equal(pmf([]), [1.0])
    assert np.allclose(pmf([1.0, 1.0, 0.0]), [0, 0, 1, 0])
    with pytest.raises(ZipMoEError, match=r"\[0, 1\]"):
        pmf([0.5, 1.5])


def test_split_bounds():
    assert split_bounds([2, 0, 3, 1], 10) == [(0, 2), (2, 2), (2, 5), (5, 6), (6, 10)]
    with pytest.raises(ZipMoEError):
        split_bounds([6, 6], 10)


def test_dp_agrees_with_monte_carlo_on_a_real_curve():
    """Pool hit counts sampled from independent Bernoulli(p_r) match the DP within sampling error."""
    curve = profile_curves("qwen1.5-moe-a2.7b", 1, 60)[0]
    bounds = split_bounds([3, 10, 5, 12], 60)
    n = 40_000
    active = np.random.default_rng(0).random((n, 60)) < curve  # [n, E] sampled steps
    counts = np.stack([active[:, lo:hi].sum(axis=1) for lo, hi in bounds], axis=1)
    for j, f in enumerate(range_pmfs(curve, bounds)):
        emp = np.bincount(counts[:, j], minlength=len(f))[: len(f)] / n
        se = np.sqrt(f * (1 - f) / n)
        assert np.all(np.abs(emp - f) <= 5 * se + 1e-4), (j, emp, f)
    # the joint (product of independent pools) against the empirical joint
    combos, probs = joint_hits(range_pmfs(curve, bounds), cutoff=1e-12)
    emp_joint = {tuple(r): c / n for r, c in zip(*np.unique(counts, axis=0, return_counts=True), strict=True)}
    for row, prob in zip(combos, probs, strict=True):
        if prob > 0.01:
            se = np.sqrt(prob * (1 - prob) / n)
            assert abs(emp_joint.get(tuple(row), 0.0) - prob) <= 5 * se


def test_joint_conditioned_on_total_matches_rejection_sampling():
    """Conditioning on exactly k active ranks equals sampling and keeping only steps with k active."""
    curve = profile_curves("deepseek-v2-lite", 1, 64)[0]
    bounds = split_bounds([4, 8, 8, 8], 64)
    combos, probs = joint_hits(range_pmfs(curve, bounds), cutoff=0.0, total=6)
    assert np.all(combos.sum(axis=1) == 6) and probs.sum() == pytest.approx(1.0)
    active = np.random.default_rng(1).random((60_000, 64)) < curve
    keep = active[active.sum(axis=1) == 6]
    emp = np.stack([keep[:, lo:hi].sum(axis=1) for lo, hi in bounds], axis=1)
    mean_dp = probs @ combos
    assert np.allclose(emp.mean(axis=0), mean_dp, atol=5 * emp.std(axis=0).max() / np.sqrt(len(keep)) + 1e-3)


def test_cutoff_only_drops_unlikely_combinations():
    pmfs = range_pmfs(np.full(20, 0.2), split_bounds([5, 5, 5, 5], 20))
    full, p_full = joint_hits(pmfs, cutoff=0.0)
    cut, p_cut = joint_hits(pmfs, cutoff=1e-6)
    assert p_full.sum() == pytest.approx(1.0) and len(cut) < len(full)
    assert 1 - p_cut.sum() < 1e-6 * len(full)
