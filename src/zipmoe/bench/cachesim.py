"""Cache simulation: decode-step hit rates of eviction policies on the calibrated routing, no model.

bench stage. Drives the real ExpertCache (tiny slots, no I/O) with the seeded RoutingSampler the speed
benchmarks use, so a policy can be compared in seconds on any machine; hit rates are counts, so the
machine does not matter. Batch 1: `requests` requests one after another (prefill, then decode), the
cache kept across them; batch B: one batch of B requests. Token counts per expert are passed to the
cache as the engine does (cache.acquire(keys, tokens)).

    python -m zipmoe.bench.cachesim --capacity 135 --batch 1 16 --policies lru lrfu lrfu-per-access

`--ceilings` adds two batch-1 rows no online policy can beat, for the same draws: "oracle" keeps each
request's most likely experts (it knows the sampler's weights); "request-counts" keeps, before every
step, the experts the current request has used most so far, prefill included, and may swap any
number of them for free. How far a policy sits below them says how much eviction can still give.

L=MoE layers E=experts k=top-k.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping

import numpy as np

from zipmoe.bench.routing import PROFILE_MODELS, RoutingSampler
from zipmoe.cache import ExpertCache, MemoryBudget
from zipmoe.cache.policy import LRFU, EvictionPolicy, eviction_factory
from zipmoe.types import ExpertKey, State


class PerAccessLRFU(LRFU):
    """LRFU as it was before token weights (age in accesses, every access weight 1): the ablation row."""

    def __init__(self, half_life: float | None = None) -> None:
        super().__init__(half_life)

    def sized(self, capacity: int) -> None:
        if self._half_life is None:
            self._half_life = max(8.0, 1.2 * capacity)  # that version's default

    def accessed(self, tokens: Mapping[ExpertKey, float]) -> None:
        return None  # no layer calls: each access ages the others by one and weighs 1


class UnweightedLRFU(LRFU):
    """LRFU with age in layer calls but every access weight 1 (what the token counts add)."""

    def accessed(self, tokens: Mapping[ExpertKey, float]) -> None:
        super().accessed({})


POLICIES: dict[str, Callable[[], EvictionPolicy]] = {
    "lrfu-per-access": PerAccessLRFU, "lrfu-unweighted": UnweightedLRFU,
}


def simulate(policy: str, capacity: int, batch: int, *, prompt_len: int = 64, new_tokens: int = 64,
             requests: int = 6, model: str = "qwen1.5-moe-a2.7b", experts: int = 60, top_k: int = 4,
             layers: int = 6, seed: int = 0) -> float:
    """Share of decode-step expert accesses (each needed expert once per layer call) the C pool served."""
    sampler = RoutingSampler(model, experts, top_k, layers, seed=seed)
    factory = POLICIES.get(policy) or eviction_factory(policy)
    cache = ExpertCache(MemoryBudget(1 << 40), 64, 64, "cpu", capacities={State.C: capacity}, eviction=factory)
    hits = accesses = 0

    def layer_call(layer: int, ids: np.ndarray) -> tuple[int, int]:
        counts = np.bincount(ids.ravel(), minlength=experts)
        needed = np.flatnonzero(counts)
        keys = [ExpertKey(layer, int(e)) for e in needed]
        with cache.acquire(keys, counts[needed].tolist()) as lease:
            for key, state in zip(keys, lease.states, strict=True):
                if state is State.MISS:
                    cache.targets(key)
                    cache.commit(key, e_nbytes=64)
            return sum(s is not State.MISS for s in lease.states), len(keys)

    groups = [[sampler.new_request()] for _ in range(requests)] if batch == 1 else [
        [sampler.new_request() for _ in range(batch)]]
    for rows in groups:
        for layer in range(layers):
            layer_call(layer, np.concatenate([r.step(layer, prompt_len) for r in rows]))
        for _ in range(new_tokens):
            for layer in range(layers):
                h, a = layer_call(layer, np.concatenate([r.step(layer, 1) for r in rows]))
                hits, accesses = hits + h, accesses + a
    return hits / accesses


def ceilings(capacity: int, *, prompt_len: int = 64, new_tokens: int = 64, requests: int = 6,
             model: str = "qwen1.5-moe-a2.7b", experts: int = 60, top_k: int = 4, layers: int = 6,
             seed: int = 0) -> dict[str, float]:
    """Decode hit rates at batch 1 of the "oracle" and "request-counts" caches (see the module docstring)."""
    sampler = RoutingSampler(model, experts, top_k, layers, seed=seed)
    oracle = counted = accesses = 0.0
    for _ in range(requests):
        req = sampler.new_request()
        counts = np.stack([np.bincount(req.step(layer, prompt_len).ravel(), minlength=experts)
                           for layer in range(layers)]).astype(np.float64)  # [L, E]
        # a Plackett-Luce draw of k without replacement: the chance each expert is among a step's k
        probs = np.stack([_inclusion(req.expert_weights(layer), top_k) for layer in range(layers)])
        best = np.zeros(layers * experts, dtype=bool)
        best[np.argsort(-probs.ravel(), kind="stable")[:capacity]] = True
        for _ in range(new_tokens):
            kept = np.zeros(layers * experts, dtype=bool)
            kept[np.argsort(-counts.ravel(), kind="stable")[:capacity]] = True
            for layer in range(layers):
                ids = np.unique(req.step(layer, 1))
                oracle += best[layer * experts + ids].sum()
                counted += kept[layer * experts + ids].sum()
                accesses += len(ids)
                counts[layer, ids] += 1
    return {"oracle": oracle / accesses, "request-counts": counted / accesses}


def _inclusion(weights: np.ndarray, k: int, draws: int = 20000, seed: int = 0) -> np.ndarray:
    """P(expert among the k drawn without replacement ∝ weights), by Gumbel-top-k sampling."""
    keys = np.log(weights) + np.random.default_rng(seed).gumbel(size=(draws, len(weights)))
    top = np.argpartition(keys, len(weights) - k, axis=1)[:, len(weights) - k:]
    return np.bincount(top.ravel(), minlength=len(weights)) / draws


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zipmoe.bench.cachesim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--capacity", type=int, nargs="+", default=[135], help="C-pool entries (all layers share them)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--policies", nargs="+", default=["lru", "lrfu-per-access", "lrfu-unweighted", "lrfu"])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps per request (batch 1)")
    p.add_argument("--batch-tokens", type=int, default=16, help="decode steps of the batch (batch > 1)")
    p.add_argument("--requests", type=int, default=6, help="sequential requests at batch 1")
    p.add_argument("--model", default="qwen1.5-moe-a2.7b", choices=PROFILE_MODELS)
    p.add_argument("--experts", type=int, default=60)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ceilings", action="store_true", help="also the batch-1 oracle and request-counts rows")
    a = p.parse_args(argv)
    rows = []
    for cap in a.capacity:
        for batch in a.batch:
            for pol in a.policies:
                rate = simulate(pol, cap, batch, prompt_len=a.prompt_len,
                                new_tokens=a.new_tokens if batch == 1 else a.batch_tokens, requests=a.requests,
                                model=a.model, experts=a.experts, top_k=a.top_k, layers=a.layers, seed=a.seed)
                rows.append({"capacity": cap, "batch": batch, "policy": pol, "decode_hit_rate": rate})
                print(json.dumps(rows[-1]), flush=True)
        if a.ceilings:
            bounds = ceilings(cap, prompt_len=a.prompt_len, new_tokens=a.new_tokens, requests=a.requests,
                              model=a.model, experts=a.experts, top_k=a.top_k, layers=a.layers, seed=a.seed)
            for name, rate in bounds.items():
                rows.append({"capacity": cap, "batch": 1, "policy": name, "decode_hit_rate": rate})
                print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
