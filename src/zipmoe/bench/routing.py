"""Seeded expert-routing sampler calibrated to real MoE routing, for speed benchmarks.

bench stage: replaces the router's top-k in every system compared (the torch glue lives elsewhere),
because random-weight models route degenerately. Model of routing: per request and MoE layer, a random
permutation maps experts onto a per-rank weight curve w (sorted, sums to 1); every token (prefill or
decode) draws its top-k experts without replacement with probability ∝ w (Plackett-Luce, sampled by
Gumbel-top-k). w is *fitted* so that the sampler's own sorted per-window counts over the profile's
window_steps (~19) reproduce the measured window curve of data/routing_profiles.json, small-sample
inflation of the top ranks included. Fits are deterministic and cached (in-process and on disk).
Draws for (request r, layer l) come from their own stream, so the same sequence reaches every system
whatever the order in which layers, requests or token chunks are asked for. Pure numpy, no torch.
L=MoE layers E=experts k=top-k T=steps per window N=simulated windows.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from zipmoe.errors import ZipMoEError
from zipmoe.planner.profile_io import resample_curve  # one resampling rule for the planner's priors and this

PROFILE_MODELS = ("qwen1.5-moe-a2.7b", "deepseek-v2-lite")
FIT_VERSION = 1  # bump when the fitting procedure changes (invalidates disk caches)
_FIT = dict(windows=2000, iters=30, alpha=0.5, eps=2e-3, seed=0)  # N, iterations, damping, log floor, seed


@functools.cache
def load_profiles() -> dict:
    """The shipped routing profiles (package data, so `zipmoe bench` works without ../shared)."""
    return json.loads(resources.files("zipmoe.data").joinpath("routing_profiles.json").read_text())


def _profile(model: str) -> dict:
    models = load_profiles()["models"]
    if model not in models:
        raise ZipMoEError(f"no routing profile for {model!r}: choose one of {sorted(models)}")
    return models[model]


def window_target(model: str, profile_layer: int, num_experts: int, top_k: int) -> np.ndarray:
    """The measured window curve of one profile layer, resampled if (E, k) differs from the real model."""
    p = _profile(model)
    curve = np.asarray(p["window"][profile_layer], dtype=np.float64)
    if (num_experts, top_k) == (p["num_experts"], p["top_k"]):
        return curve
    return resample_curve(curve, num_experts, top_k)


def sorted_window_counts(weights: np.ndarray, top_k: int, gumbel: np.ndarray) -> np.ndarray:
    """Mean over windows of the sorted per-expert counts ÷ steps, for Gumbel noise [N, T, E]."""
    n, t, e = gumbel.shape
    keys = np.log(weights.astype(gumbel.dtype)) + gumbel
    top = np.argpartition(keys.reshape(-1, e), e - top_k, axis=1)[:, e - top_k:]
    counts = np.bincount(np.repeat(np.arange(n), t * top_k) * e + top.ravel(), minlength=n * e)
    return np.sort(counts.reshape(n, e), axis=1)[:, ::-1].mean(axis=0) / t


def fit_weights(target: np.ndarray, top_k: int, steps: int, *, windows: int = _FIT["windows"],
                iters: int = _FIT["iters"], alpha: float = _FIT["alpha"], eps: float = _FIT["eps"],
                seed: int = _FIT["seed"]) -> np.ndarray:
    """Per-rank sampling weights whose simulated sorted window counts match `target` (sorted, sums to k).

    Damped multiplicative fixed-point iteration on common random numbers (deterministic):
    w_r ← w_r · ((t_r + ε) / (s_r(w) + ε))^α, re-sorted and renormalised; starts from uniform.
    """
    e = len(target)
    if not (0 < top_k < e) or abs(float(np.sum(target)) - top_k) > 1e-2 * top_k:
        raise ZipMoEError(f"window curve must have more than top_k={top_k} ranks and sum to top_k")
    gumbel = np.random.default_rng(seed).gumbel(size=(windows, steps, e)).astype(np.float32)
    w = np.full(e, 1.0 / e)
    for _ in range(iters):
        s = sorted_window_counts(w, top_k, gumbel)
        w = np.sort(w * np.exp(alpha * (np.log(target + eps) - np.log(s + eps))))[::-1]
        w = np.maximum(w / w.sum(), 1e-12)
    return w / w.sum()


def _cache_dir() -> Path:
    root = os.environ.get("ZIPMOE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "zipmoe")
    return Path(root) / "routing"


def _fit_name(model: str, num_experts: int, top_k: int, profile_layer: int) -> tuple[str, np.ndarray]:
    """File name of a fit (a digest of everything it depends on) and its target curve."""
    p = _profile(model)
    if not 0 <= profile_layer < len(p["window"]):
        raise ZipMoEError(f"{model} has {len(p['window'])} profiled layers, asked for {profile_layer}")
    target = window_target(model, profile_layer, num_experts, top_k)
    key = json.dumps([FIT_VERSION, _FIT, p["window_steps"], top_k, target.tolist()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"{model}-E{num_experts}-k{top_k}-l{profile_layer}-{digest}.npy", target


def _save(path: Path, w: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, w)
    tmp.replace(path)


@functools.cache
def fitted_weights(model: str, num_experts: int, top_k: int, profile_layer: int) -> np.ndarray:
    """Fitted rank weights [E] of one profile layer of `model` at (E, k); read-only.

    Looked up in the package (zipmoe/data/routing_fit/, see export_fits), then the user cache
    ($ZIPMOE_CACHE_DIR or ~/.cache/zipmoe/routing), else fitted (~0.5-1.5 s) and cached.
    """
    name, target = _fit_name(model, num_experts, top_k, profile_layer)
    shipped = resources.files("zipmoe.data").joinpath("routing_fit").joinpath(name)
    for src in (shipped, _cache_dir() / name):
        try:
            with src.open("rb") as f:
                w = np.load(f)
        except (OSError, ValueError):
            continue
        if w.shape == (num_experts,):
            w.flags.writeable = False
            return w
    w = fit_weights(target, top_k, _profile(model)["window_steps"])
    with contextlib.suppress(OSError):  # an unwritable cache only costs a refit
        _save(_cache_dir() / name, w)
    w.flags.writeable = False
    return w


def export_fits(dest: str | os.PathLike[str]) -> list[Path]:
    """Write each profiled model's fits at its real (E, k) into dest (to ship as zipmoe/data/routing_fit/)."""
    out = []
    for model in PROFILE_MODELS:
        p = _profile(model)
        for layer in range(len(p["window"])):
            name, _ = _fit_name(model, p["num_experts"], p["top_k"], layer)
            out.append(Path(dest) / name)
            _save(out[-1], fitted_weights(model, p["num_experts"], p["top_k"], layer))
    return out


class RequestRouting:
    """The routing of one request: per layer a permutation of experts onto the rank weights."""

    def __init__(self, sampler: RoutingSampler, index: int):
        self.sampler, self.index = sampler, index
        self._rngs: dict[int, np.random.Generator] = {}
        self._logw: dict[int, np.ndarray] = {}

    def _layer(self, layer: int) -> tuple[np.random.Generator, np.ndarray]:
        if layer not in self._rngs:
            i = self.sampler.layer_index(layer)
            ss = np.random.SeedSequence(self.sampler.seed, spawn_key=(self.index, i))
            rng = np.random.Generator(np.random.PCG64(ss))
            perm = rng.permutation(self.sampler.num_experts)  # perm[rank] = expert id
            logw = np.empty(self.sampler.num_experts)
            logw[perm] = np.log(self.sampler.weights[i])
            self._rngs[layer], self._logw[layer] = rng, logw
        return self._rngs[layer], self._logw[layer]

    def expert_weights(self, layer: int) -> np.ndarray:
        """Sampling weight of each expert id at `layer` for this request [E]."""
        return np.exp(self._layer(layer)[1])

    def step(self, layer: int, n_tokens: int = 1) -> np.ndarray:
        """Top-k expert ids [n_tokens, k] (int64), distinct per token, ordered by descending key like topk."""
        if n_tokens < 0:
            raise ZipMoEError(f"n_tokens must be non-negative, got {n_tokens}")
        rng, logw = self._layer(layer)
        k, e = self.sampler.top_k, self.sampler.num_experts
        u = rng.random((n_tokens, e))  # one double per (token, expert): chunking-invariant stream
        keys = logw - np.log(-np.log(u))  # Gumbel-max keys, 1 - u would be the same law
        top = np.argpartition(keys, e - k, axis=1)[:, e - k:]
        order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1, kind="stable")
        return np.take_along_axis(top, order, axis=1).astype(np.int64)


class RoutingSampler:
    """Calibrated, seeded routing for benchmarks: new_request(), then step(layer, n_tokens) per layer call.

    `model` picks the profile ("qwen1.5-moe-a2.7b" | "deepseek-v2-lite"); (num_experts, top_k) may differ
    from the profiled model (the curve is resampled, calibration then approximate). `layer_ids` are the
    decoder-layer indices of the MoE layers (default 0..num_layers-1; DeepSeek-V2: 1..26); the i-th MoE
    layer uses profile layer i (or i·P/num_layers when there are more layers than profiled).
    """

    def __init__(self, model: str, num_experts: int, top_k: int, num_layers: int, seed: int = 0, *,
                 layer_ids: Sequence[int] | None = None):
        if not (0 < top_k < num_experts) or num_layers <= 0:
            raise ZipMoEError(f"need 0 < top_k < num_experts and num_layers > 0, got top_k={top_k}, "
                              f"num_experts={num_experts}, num_layers={num_layers}")
        ids = list(range(num_layers)) if layer_ids is None else list(layer_ids)
        if len(ids) != num_layers or len(set(ids)) != num_layers:
            raise ZipMoEError(f"layer_ids must list {num_layers} distinct decoder-layer indices, got {ids}")
        self.model, self.num_experts, self.top_k, self.num_layers, self.seed = (
            model, num_experts, top_k, num_layers, seed)
        self.layer_ids = tuple(ids)  # decoder-layer index of each MoE layer, in order
        self._index = {lid: i for i, lid in enumerate(ids)}
        prof = _profile(model)
        p = len(prof["window"])
        self.profile_layers = [i if num_layers <= p else i * p // num_layers for i in range(num_layers)]
        self.weights = np.stack([fitted_weights(model, num_experts, top_k, i) for i in self.profile_layers])
        self.weights.flags.writeable = False  # [L, E] per-rank weights, sorted descending
        self.window_steps: int = prof["window_steps"]
        self._requests = 0
        self.current: RequestRouting | None = None

    def layer_index(self, layer: int) -> int:
        """MoE-layer ordinal of decoder layer `layer`."""
        if layer not in self._index:
            raise ZipMoEError(f"layer {layer} is not an MoE layer of this sampler: {sorted(self._index)}")
        return self._index[layer]

    def new_request(self) -> RequestRouting:
        """Start the next request (requests are numbered 0, 1, … in creation order, per sampler)."""
        self.current = RequestRouting(self, self._requests)
        self._requests += 1
        return self.current

    def step(self, layer: int, n_tokens: int = 1) -> np.ndarray:
        """Top-k expert ids [n_tokens, k] for the current request (see RequestRouting.step)."""
        if self.current is None:
            raise ZipMoEError("call new_request() before step()")
        return self.current.step(layer, n_tokens)

    def rank_probs(self, windows: int = 2000) -> np.ndarray:
        """Per-step activation probability of the r-th ranked expert [L, E] (Monte-Carlo, deterministic)."""
        g = np.random.default_rng(1).gumbel(size=(windows, self.num_experts))
        out = np.empty((self.num_layers, self.num_experts))
        for i, w in enumerate(self.weights):
            top = np.argpartition(np.log(w) + g, self.num_experts - self.top_k, axis=1)[:, -self.top_k:]
            out[i] = np.bincount(top.ravel(), minlength=self.num_experts) / windows
        return out


class RouterOverride:
    """Torch-free hook the engine/baselines call instead of the router's top-k.

    begin(batch_size) starts a batch (one new request per row); then each MoE layer's forward calls
    topk(layer, batch_size, seq_len) → ids [batch·seq, k], row-major (token t of row b at b·seq + t),
    matching hidden_states.view(-1, H). Padding tokens are drawn like any other token.
    """

    def __init__(self, sampler: RoutingSampler, enabled: bool = True):
        self.sampler, self.enabled = sampler, enabled
        self.rows: list[RequestRouting] = []

    def begin(self, batch_size: int) -> None:
        self.rows = [self.sampler.new_request() for _ in range(batch_size)]

    def topk(self, layer: int, batch_size: int, seq_len: int) -> np.ndarray:
        if batch_size != len(self.rows):
            raise ZipMoEError(f"batch of {batch_size} rows but begin() was called for {len(self.rows)}")
        return np.concatenate([r.step(layer, seq_len) for r in self.rows], axis=0)


@dataclass(frozen=True, slots=True)
class LRUStats:
    """Outcome of lru_hit_rate: per-layer LRU caches of whole (uncompressed) experts."""

    decode_hits: int  # decode-step expert accesses already cached
    decode_accesses: int  # decode steps × layers × k
    prefill_hits: int  # distinct experts of a prefill layer call already cached
    prefill_needed: int  # distinct experts over all prefill layer calls

    @property
    def decode_hit_rate(self) -> float:
        return self.decode_hits / max(1, self.decode_accesses)

    @property
    def prefill_hit_rate(self) -> float:
        return self.prefill_hits / max(1, self.prefill_needed)


def lru_hit_rate(sampler: RoutingSampler, capacity_per_layer: int, prompt_len: int, new_tokens: int,
                 *, requests: int = 16) -> LRUStats:
    """Simulate per-layer LRU caches over `requests` sequential batch-1 requests (prefill, then decode)."""
    caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(sampler.num_layers)]
    layers = sampler.layer_ids
    dh = da = ph = pn = 0

    def touch(cache: OrderedDict[int, None], expert: int) -> bool:
        hit = expert in cache
        cache[expert] = None
        cache.move_to_end(expert)
        if len(cache) > capacity_per_layer:
            cache.popitem(last=False)
        return hit

    for _ in range(requests):
        req = sampler.new_request()
        if prompt_len > 0:
            for i, layer in enumerate(layers):
                ids = req.step(layer, prompt_len).ravel()
                needed = set(ids.tolist())
                ph += len(needed & set(caches[i]))
                pn += len(needed)
                for x in ids.tolist():
                    touch(caches[i], x)
        for _ in range(new_tokens):
            for i, layer in enumerate(layers):
                dh += sum(touch(caches[i], x) for x in req.step(layer, 1)[0].tolist())
                da += sampler.top_k
    return LRUStats(dh, da, ph, pn)



def calibration_error(sampler: RoutingSampler, windows: int = 3000, seed: int = 1) -> np.ndarray:
    """Per layer: max |simulated sorted window counts − measured window curve| with fresh noise [L]."""
    g = np.random.default_rng(seed).gumbel(size=(windows, sampler.window_steps, sampler.num_experts))
    g = g.astype(np.float32)
    return np.array([np.abs(sorted_window_counts(w, sampler.top_k, g) - window_target(
        sampler.model, pl, sampler.num_experts, sampler.top_k)).max()
        for w, pl in zip(sampler.weights, sampler.profile_layers, strict=True)])


def main(argv: list[str] | None = None) -> int:
    """`python -m zipmoe.bench.routing [--export DIR]`: calibration and LRU hit-rate report."""
    ap = argparse.ArgumentParser(prog="python -m zipmoe.bench.routing", description=main.__doc__)
    ap.add_argument("--export", type=Path, help="also write the fits to DIR (zipmoe/data/routing_fit)")
    ap.add_argument("--requests", type=int, default=16)
    args = ap.parse_args(argv)
    if args.export:
        print(f"wrote {len(export_fits(args.export))} fits to {args.export}")
    for model in PROFILE_MODELS:
        p = _profile(model)
        e, k = p["num_experts"], p["top_k"]
        sampler = RoutingSampler(model, e, k, len(p["window"]), seed=0)
        err = calibration_error(sampler)
        print(f"{model}: calibration max|err| over layers {err.max():.4f} (median {np.median(err):.4f})")
        for cap in (e // 4, round(e / 4 / 0.66), e // 2, round(e / 2 / 0.66)):
            for prompt_len in (0, 64, 512):
                st = lru_hit_rate(sampler, cap, prompt_len, 64, requests=args.requests)
                print(f"  LRU {cap:2d}/{e} experts/layer, prompt {prompt_len:3d}, 64 new: "
                      f"decode hits {st.decode_hit_rate:.3f}, prefill hits {st.prefill_hit_rate:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
