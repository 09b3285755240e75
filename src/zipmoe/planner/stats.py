"""Routing statistics: per-layer decayed activation counts → expert ranks and rank-frequency curves.

Arrow: the engine's router (needed experts of each MoE layer call) ──observe()──▶ RoutingStats ──▶
rank_of() for admission (planner/admission.py) and snapshot() curves p_r for capacity planning.
observe() runs on the engine thread, O(k) per call; snapshot() may run on a planning thread.
Decay: each observation of a layer multiplies that layer's past by `decay`, so statistics follow
drift with a half-life of ln 2 / −ln(decay) calls. Implemented O(k) by growing the weight of new
observations instead of shrinking old ones (renormalised now and then, O(E)).

# L=MoE layers E=experts per layer k=experts needed per call; p_r in [0, 1]
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from zipmoe.errors import ZipMoEError

_RENORM = 1e100  # rescale a layer's counts when the observation weight grows past this


@dataclass(frozen=True, slots=True)
class RankSnapshot:
    """Rank-frequency curves of every layer at one moment (what a plan is made for)."""

    layers: tuple[int, ...]  # decoder layer ids, in row order of curves
    curves: np.ndarray  # [L, E] p_r: probability the r-th most used expert is active at a call, descending
    observations: tuple[float, ...]  # per layer: effective number of calls behind the curve (decayed)

    def curve(self, layer: int) -> np.ndarray:
        """p_r [E] of one layer id."""
        return self.curves[self.layers.index(layer)]


def rank_drift(a: RankSnapshot, b: RankSnapshot) -> float:
    """Largest per-layer total-variation distance between the normalised rank curves, in [0, 1].

    The plan depends only on the curves' shape (which expert holds a rank is followed live by the
    admission policy), so this is the measure that says a plan has gone stale.
    """
    if a.layers != b.layers or a.curves.shape != b.curves.shape:
        raise ZipMoEError("rank snapshots cover different layers or expert counts; they cannot be compared")
    if not a.layers:
        return 0.0
    na = a.curves / np.maximum(a.curves.sum(axis=1, keepdims=True), 1e-300)
    nb = b.curves / np.maximum(b.curves.sum(axis=1, keepdims=True), 1e-300)
    return float(0.5 * np.abs(na - nb).sum(axis=1).max())


class RoutingStats:
    """Online per-layer activation frequencies with exponential decay (see the module docstring)."""

    def __init__(self, layers: Iterable[int], num_experts: int, decay: float = 0.998):
        self.layers = tuple(int(x) for x in layers)
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ZipMoEError(f"RoutingStats needs distinct MoE layer ids, got {self.layers}")
        if num_experts < 1:
            raise ZipMoEError(f"num_experts must be >= 1, got {num_experts}")
        if not 0.0 < decay <= 1.0:
            raise ZipMoEError(f"decay must be in (0, 1] (1 = never forget), got {decay}")
        self.num_experts, self.decay = int(num_experts), float(decay)
        self._row = {layer: i for i, layer in enumerate(self.layers)}
        n = len(self.layers)
        self._counts = np.zeros((n, self.num_experts))  # weighted activations, scaled by _weight
        self._steps = np.zeros(n)  # weighted calls, same scale
        self._weight = np.ones(n)  # weight the next observation gets (grows by 1/decay per call)
        self._rank = np.tile(np.arange(self.num_experts), (n, 1))  # expert -> rank, refreshed lazily
        self._dirty = np.zeros(n, dtype=bool)
        self._lock = threading.Lock()

    # ---- engine thread: O(k) per call ----

    def observe(self, layer: int, experts: Sequence[int] | np.ndarray, weight: float = 1.0) -> None:
        """One MoE layer call needed `experts` (distinct ids); `weight` < 1 counts it less (e.g. prefill)."""
        row = self._row.get(layer)
        if row is None:
            raise ZipMoEError(f"layer {layer} is not an MoE layer of these statistics ({self.layers})")
        with self._lock:
            w = self._weight[row] * weight
            self._counts[row, experts] += w
            self._steps[row] += w
            self._weight[row] /= self.decay
            if self._weight[row] > _RENORM:
                self._rescale(row, 1.0 / self._weight[row])
            self._dirty[row] = True

    def _rescale(self, row: int, factor: float) -> None:
        self._counts[row] *= factor
        self._steps[row] *= factor
        self._weight[row] *= factor

    def rank_of(self, layer: int, expert: int) -> int:
        """Current rank (0 = most used) of an expert in its layer; re-sorts at most once per call of the layer."""
        row = self._row[layer]
        if self._dirty[row]:
            with self._lock:
                order = np.argsort(-self._counts[row], kind="stable")
                self._dirty[row] = False
            self._rank[row, order] = np.arange(self.num_experts)
        return int(self._rank[row, expert])

    # ---- any thread ----

    def ranking(self, layer: int) -> np.ndarray:
        """Expert ids [E] of a layer, most used first (ties by id)."""
        with self._lock:
            return np.argsort(-self._counts[self._row[layer]], kind="stable")

    def frequencies(self, layer: int) -> np.ndarray:
        """Per expert id [E]: decayed share of calls that needed it (0 before any observation)."""
        row = self._row[layer]
        with self._lock:
            steps = self._steps[row]
            return self._counts[row] / steps if steps > 0 else np.zeros(self.num_experts)

    def observations(self, layer: int) -> float:
        """Effective number of calls behind a layer's statistics (decayed; 0 = nothing observed)."""
        row = self._row[layer]
        with self._lock:
            return float(self._steps[row] / self._weight[row] / self.decay)

    def snapshot(self) -> RankSnapshot:
        """Rank curves of every layer now (copied; safe to plan with on another thread)."""
        with self._lock:
            counts, steps = self._counts.copy(), self._steps.copy()
            eff = steps / self._weight / self.decay
        freq = np.divide(counts, steps[:, None], out=np.zeros_like(counts), where=steps[:, None] > 0)
        curves = np.minimum(-np.sort(-freq, axis=1), 1.0)
        return RankSnapshot(self.layers, curves, tuple(float(x) for x in eff))

    def seed(self, layer: int, curve: np.ndarray, weight: float = 64.0) -> None:
        """Replace a layer's statistics by a prior: expert r gets p_r, as if seen over `weight` calls.

        Which expert holds which rank is unknown in a prior (identity is assumed); live observations
        sort that out within a few half-lives.
        """
        curve = np.asarray(curve, dtype=np.float64)
        if curve.shape != (self.num_experts,) or not np.all((curve >= 0) & (curve <= 1)) or weight <= 0:
            raise ZipMoEError(
                f"a prior curve must be [{self.num_experts}] probabilities with a positive weight, "
                f"got shape {curve.shape}, weight {weight}"
            )
        row = self._row[layer]
        with self._lock:
            self._counts[row] = curve * weight
            self._steps[row] = weight
            self._weight[row] = 1.0
            self._dirty[row] = True

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that restore these statistics exactly (persistence, see profile_io.py)."""
        with self._lock:
            return {"counts": self._counts / self._weight[:, None], "steps": self._steps / self._weight}

    def restore(self, counts: np.ndarray, steps: np.ndarray) -> None:
        """Inverse of state(); shapes and values are checked by the caller (profile_io.load_stats)."""
        with self._lock:
            self._counts = np.array(counts, dtype=np.float64)
            self._steps = np.array(steps, dtype=np.float64)
            self._weight = np.ones(len(self.layers))
            self._dirty[:] = True

    def half_life(self) -> float:
        """Calls of a layer after which an observation counts half (inf without decay)."""
        return math.inf if self.decay == 1.0 else math.log(2.0) / -math.log(self.decay)


def batch_curves(curves: np.ndarray, batch: int, samples: int = 128, seed: int = 0) -> np.ndarray:
    """Rank curves of a layer call that serves `batch` requests at once, from per-request curves [L, E].

    Why: a cache is sized for the experts a layer call needs, and a batch needs the union of its
    requests' experts. Requests route independently (each its own permutation of experts onto the
    curve), so expert e is active with 1 − Π_b (1 − p_{π_b(e)}); the result is that union's expected
    sorted profile, by `samples` seeded Monte-Carlo permutations. batch 1 returns the curves as given.
    """
    curves = np.asarray(curves, dtype=np.float64)
    if batch < 1 or samples < 1:
        raise ZipMoEError(f"batch and samples must be >= 1, got {batch}, {samples}")
    if batch == 1:
        return curves.copy()
    rng = np.random.default_rng(seed)
    out = np.empty_like(curves)
    for row, curve in enumerate(curves):
        drawn = rng.permuted(np.broadcast_to(curve, (samples, batch, len(curve))), axis=2)
        union = 1.0 - np.prod(1.0 - drawn, axis=1)  # [samples, E]
        out[row] = -np.sort(-union, axis=1).mean(axis=0)
    return out


def seed_from_curves(stats: RoutingStats, curves: np.ndarray, weight: float = 64.0) -> None:
    """Seed every layer of `stats` with rows of `curves` [L, E] (in stats.layers order)."""
    if len(curves) != len(stats.layers):
        raise ZipMoEError(f"{len(curves)} prior curves for {len(stats.layers)} MoE layers")
    for layer, curve in zip(stats.layers, curves, strict=True):
        stats.seed(layer, curve, weight)
