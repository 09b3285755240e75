"""Poisson-binomial hit distributions: how many needed experts of one layer step land in each pool.

Arrow: rank curve p_r (stats.py) + the pools' contiguous rank ranges ──▶ per-pool count PMFs ──▶ the
joint distribution of (F, C, S, E, miss) hits that capacity.py turns into an expected layer makespan.
Model (the paper's): rank r of a layer is active at a step independently with probability p_r, so a
pool's hit count is a sum of independent Bernoullis (Poisson-binomial), and the pools' counts are
independent of each other. Optionally conditioned on the step's total (exactly k experts at batch 1).
Pure numpy; runs on whichever thread plans.

# R=ranks in a range P=pools M=hit combinations; probabilities in [0, 1]
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from zipmoe.errors import ZipMoEError


def pmf(p: np.ndarray | Sequence[float]) -> np.ndarray:
    """Exact PMF [R+1] of the number of successes of independent Bernoulli(p_i): the convolution DP
    DP_i[j] = DP_{i-1}[j]·(1 − p_i) + DP_{i-1}[j−1]·p_i, one vectorised step per rank."""
    probs = np.asarray(p, dtype=np.float64).ravel()
    if probs.size and (not np.all(np.isfinite(probs)) or probs.min() < 0.0 or probs.max() > 1.0):
        raise ZipMoEError(f"activation probabilities must lie in [0, 1], got min {probs.min()} max {probs.max()}")
    out = np.zeros(probs.size + 1)
    out[0] = 1.0
    for i, q in enumerate(probs):
        out[1 : i + 2] = out[1 : i + 2] * (1.0 - q) + out[: i + 1] * q
        out[0] *= 1.0 - q
    return out


def range_pmfs(p: np.ndarray, bounds: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """PMF of the hit count of each contiguous rank range [lo, hi) of the curve p."""
    n = len(p)
    for lo, hi in bounds:
        if not 0 <= lo <= hi <= n:
            raise ZipMoEError(f"rank range [{lo}, {hi}) is outside the curve's {n} ranks")
    return [pmf(p[lo:hi]) for lo, hi in bounds]


def split_bounds(sizes: Sequence[int], num_ranks: int) -> list[tuple[int, int]]:
    """Contiguous ranges for pools of `sizes` ranks in order, plus the rest (the miss range) last."""
    if any(s < 0 for s in sizes) or sum(sizes) > num_ranks:
        raise ZipMoEError(f"pool sizes {list(sizes)} must be >= 0 and cover at most {num_ranks} ranks")
    edges = [int(x) for x in itertools.accumulate(sizes, initial=0)]
    return [*itertools.pairwise(edges), (edges[-1], num_ranks)]


def joint_hits(
    pmfs: Sequence[np.ndarray], cutoff: float = 1e-10, total: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Joint distribution of independent per-pool counts as sparse (counts [M, P] int, probs [M]).

    Combinations less likely than `cutoff` are dropped while the product is built (their mass is
    lost: probs sums to 1 − lost; the caller may renormalise). `total`: condition on the counts
    summing to exactly `total` (probs renormalised; empty if that total is impossible).
    """
    counts = np.zeros((1, 0), dtype=np.int64)
    probs = np.ones(1)
    floor = 0.0 if total is not None else cutoff  # conditioned: prune only after renormalising
    for f in pmfs:
        support = np.flatnonzero(f > 0.0)
        prod = probs[:, None] * f[support][None, :]
        rows, cols = np.nonzero(prod >= floor)
        counts = np.concatenate([counts[rows], support[cols, None]], axis=1)
        probs = prod[rows, cols]
        if total is not None:  # partial sums above the total can never come back down
            keep = counts.sum(axis=1) <= total
            counts, probs = counts[keep], probs[keep]
    if total is None:
        return counts, probs
    keep = counts.sum(axis=1) == total
    counts, probs = counts[keep], probs[keep]
    mass = probs.sum()
    if mass <= 0.0:
        return counts[:0], probs[:0]
    probs = probs / mass
    keep = probs >= cutoff
    return counts[keep], probs[keep] / probs[keep].sum()
