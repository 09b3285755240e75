"""Routing statistics on disk and from the shipped real routing profiles.

Arrow: RoutingStats ──save_stats()──▶ `<store>.routing-stats.json` (next to the store, which stays
immutable and checksummed) ──load_stats()──▶ a warm RoutingStats at the next load. A file written for
another store (fingerprint), expert count, layer set or file version, or whose checksum fails, is
ignored with a logged warning: statistics steer speed only, and we never trust them blindly.
profile_curves() turns data/routing_profiles.json (Qwen1.5-MoE, DeepSeek-V2-Lite) into prior curves
resampled to the model's expert count. Load time or a planning thread; plain file I/O, no torch.

# L=MoE layers E=experts k=experts per token; p_r in [0, 1]
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from zipmoe.errors import ZipMoEError
from zipmoe.planner.stats import RoutingStats
from zipmoe.store.format import MANIFEST_NAME

log = logging.getLogger(__name__)

STATS_FORMAT = "zipmoe-routing-stats"
STATS_VERSION = 1  # bump on any change of the file's meaning; other versions are ignored


def store_fingerprint(store: str | os.PathLike) -> str:
    """Identity of a store's contents: xxh3_64 of its manifest (which checksums every other file)."""
    try:
        return xxhash.xxh3_64_hexdigest((Path(store) / MANIFEST_NAME).read_bytes())
    except OSError as exc:
        raise ZipMoEError(f"cannot read {MANIFEST_NAME} of store {os.fspath(store)!r}: {exc}") from None


def stats_path(store: str | os.PathLike) -> Path:
    """Default statistics file of a store: a sibling `<store dir>.routing-stats.json`."""
    root = Path(store).resolve()
    return root.with_name(root.name + ".routing-stats.json")


def _checksum(body: dict[str, Any]) -> str:
    return xxhash.xxh3_64_hexdigest(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def save_stats(stats: RoutingStats, path: str | os.PathLike, fingerprint: str, batch: int = 1) -> bool:
    """Write the statistics atomically (temp file + rename); False (and a warning) if the disk refuses.
    batch: the requests decoded together while they were observed (a call's experts are their union)."""
    st = stats.state()
    body = {
        "format": STATS_FORMAT, "version": STATS_VERSION, "store": fingerprint, "batch": batch,
        "num_experts": stats.num_experts, "layers": list(stats.layers), "decay": stats.decay,
        "counts": st["counts"].tolist(), "steps": st["steps"].tolist(),
    }
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"checksum": _checksum(body), "body": body}))
        tmp.replace(path)
    except OSError as exc:
        log.warning("could not save routing statistics to %s (%s); the next load starts cold", path, exc)
        tmp.unlink(missing_ok=True)
        return False
    return True


def load_stats(
    path: str | os.PathLike, fingerprint: str, layers: Sequence[int], num_experts: int, decay: float = 0.998,
    batch: int = 1,
) -> RoutingStats | None:
    """Statistics saved for this store, shape and batch size, or None (with a warning unless the file is
    absent; statistics of another batch size are set aside with an info line: they are sound, but describe
    calls of another size)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("ignoring routing statistics %s: unreadable (%s)", path, exc)
        return None
    try:
        body = _validated_body(raw, fingerprint, tuple(layers), num_experts)
    except ValueError as exc:
        log.warning("ignoring routing statistics %s: %s", path, exc)
        return None
    if body["batch"] != batch:
        log.info("not using routing statistics %s: observed at batch %d, planning for batch %d starts from "
                 "the prior", path, body["batch"], batch)
        return None
    stats = RoutingStats(layers, num_experts, decay)
    stats.restore(body["counts"], body["steps"])
    return stats


def _validated_body(raw: bytes, fingerprint: str, layers: tuple[int, ...], num_experts: int) -> dict[str, Any]:
    """The file's body if it is intact and meant for this store; ValueError naming the problem."""
    try:
        doc = json.loads(raw)
        body, checksum = doc["body"], doc["checksum"]
    except (ValueError, TypeError, KeyError):
        raise ValueError("corrupt (not a statistics file)") from None
    if not isinstance(body, dict) or checksum != _checksum(body):
        raise ValueError("corrupt (checksum mismatch)")
    if body.get("format") != STATS_FORMAT or body.get("version") != STATS_VERSION:
        raise ValueError(f"written by another version ({body.get('format')} v{body.get('version')})")
    if body.get("store") != fingerprint:
        raise ValueError("stale (written for a different store)")
    if body.get("num_experts") != num_experts or tuple(body.get("layers", ())) != layers:
        raise ValueError("written for a different number of experts or MoE layers")
    counts = np.asarray(body["counts"], dtype=np.float64)
    steps = np.asarray(body["steps"], dtype=np.float64)
    ok = counts.shape == (len(layers), num_experts) and steps.shape == (len(layers),)
    if not ok or not (np.all(np.isfinite(counts)) and np.all(counts >= 0) and np.all(steps >= 0)):
        raise ValueError("corrupt (counts have the wrong shape or values)")
    if np.any(counts > steps[:, None] * (1 + 1e-9) + 1e-12):
        raise ValueError("corrupt (an expert is counted more often than its layer was called)")
    batch = body.get("batch", 1)  # files written before the field observed batch 1 (the only planned size)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"corrupt (batch {batch!r})")
    return {"counts": counts, "steps": steps, "batch": batch}


# ---- priors from the shipped real routing profiles ----

PROFILE_MODELS = ("qwen1.5-moe-a2.7b", "deepseek-v2-lite")


@functools.cache
def _profiles() -> dict[str, Any]:
    return json.loads(resources.files("zipmoe.data").joinpath("routing_profiles.json").read_text())["models"]


def resample_curve(curve: np.ndarray, num_experts: int, top_k: float) -> np.ndarray:
    """The same cumulative share over rank quantiles, re-cut into `num_experts` ranks summing to top_k,
    each p_r <= 1 (a rank is active at most once per step; with few experts the top ranks hit that cap)."""
    if not 0 < top_k <= num_experts:
        raise ZipMoEError(f"a curve of {num_experts} ranks cannot sum to top_k={top_k}: need 0 < top_k <= ranks")
    curve = np.asarray(curve, dtype=np.float64)
    cum = np.concatenate([[0.0], np.cumsum(curve) / curve.sum()])
    cut = np.interp(np.linspace(0.0, 1.0, num_experts + 1), np.linspace(0.0, 1.0, len(curve) + 1), cum)
    return _cap_at_one(np.diff(cut) * top_k)


def _cap_at_one(p: np.ndarray) -> np.ndarray:
    """Water-filling: entries above 1 are pinned at 1 and their excess goes to the others in proportion
    to their shares, until none exceeds 1. Keeps the sum (<= len(p)) and the order."""
    total, pinned = float(p.sum()), np.zeros(len(p), dtype=bool)
    while True:
        free = p[~pinned].sum()
        left = total - np.count_nonzero(pinned)
        if free > 0:
            out = np.where(pinned, 1.0, p * (left / free))
        else:  # the unpinned ranks had no share at all: spread what is left evenly
            out = np.where(pinned, 1.0, left / max(1, np.count_nonzero(~pinned)))
        over = ~pinned & (out > 1.0)
        if not over.any():
            return out
        pinned |= over


def profile_curves(
    model: str, num_layers: int, num_experts: int, top_k: int | None = None, kind: str = "window"
) -> np.ndarray:
    """Prior rank curves [num_layers, num_experts] from a real profile ('window': within a prompt,
    the decode-time skew a cache sees; 'global': across prompts). Profile layers are stretched over
    num_layers; curves are resampled when (E, k) differ from the profiled model."""
    models = _profiles()
    if model not in models:
        raise ZipMoEError(f"no routing profile for {model!r}: choose one of {sorted(models)}")
    if kind not in ("window", "global"):
        raise ZipMoEError(f"profile kind must be 'window' or 'global', got {kind!r}")
    if num_layers < 1 or num_experts < 2:
        raise ZipMoEError(f"need >= 1 layer and >= 2 experts, got {num_layers} layers, {num_experts} experts")
    prof = models[model]
    k = prof["top_k"] if top_k is None else top_k
    src = prof[kind]
    rows = np.rint(np.linspace(0, len(src) - 1, num_layers)).astype(int) if num_layers > 1 else [0]
    same = (num_experts, k) == (prof["num_experts"], prof["top_k"])
    return np.stack([
        np.asarray(src[r], dtype=np.float64) if same else resample_curve(np.asarray(src[r]), num_experts, k)
        for r in rows
    ])
