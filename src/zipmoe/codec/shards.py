"""One expert's BF16 bits → SM plane + K independently coded exponent shards (the E-chunks).

n=weights of one expert blob K=exponent shards. Shard i covers exponents [start_i, end_i) and decodes
+ merges into output slice i, so W decode workers can split one expert. Runs on the caller's thread.
"""

from __future__ import annotations

import math

import numpy as np

from zipmoe.codec.coders.base import ExponentCoder
from zipmoe.codec.planes import check_vector, split_bf16
from zipmoe.errors import CodecError

MIN_SHARD = 65536  # weights; smaller shards cost more in headers and per-call overhead than they gain
SHARD_ALIGN = 64  # shard starts are multiples of 64 weights (128-byte aligned BF16 output slices)


def shard_bounds(numel: int, k: int) -> list[tuple[int, int]]:
    """Contiguous, deterministic [start, end) ranges covering [0, numel).

    k is clamped so no shard is smaller than MIN_SHARD (one shard for tiny tensors, and one empty
    shard for numel == 0); all shards but the last have the same, 64-aligned size."""
    if isinstance(numel, bool) or not isinstance(numel, int | np.integer) or numel < 0:
        raise CodecError(f"numel must be a non-negative int, got {numel!r}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise CodecError(f"the number of exponent shards K must be an int >= 1, got {k!r}")
    numel, k = int(numel), int(k)
    k = max(1, min(k, numel // MIN_SHARD))
    step = math.ceil(math.ceil(numel / k) / SHARD_ALIGN) * SHARD_ALIGN if numel else 0
    if step == 0:
        return [(0, numel)]
    return [(start, min(start + step, numel)) for start in range(0, numel, step)]


def encode_expert(u16_flat: np.ndarray, coder: ExponentCoder, k: int) -> tuple[np.ndarray, list[bytes]]:
    """(SM plane, [coded exponent shard, ...]) of one expert's flat BF16 bits."""
    check_vector("u16_flat (an expert blob's BF16 bits)", u16_flat, np.uint16)
    sm, exp = split_bf16(u16_flat)
    bounds = shard_bounds(u16_flat.size, k)
    shared = getattr(coder, "encode_shards", None)  # coders that can share one code across shards
    if shared is not None:
        return sm, shared(exp, bounds)
    return sm, [coder.encode(exp[a:b]) for a, b in bounds]


def exponent_entropy(exp: np.ndarray) -> float:
    """Order-0 entropy H of an exponent plane in bits/symbol; the floor is (8 + H) / 16 of BF16 bytes."""
    counts = np.bincount(np.asarray(exp, dtype=np.uint8).reshape(-1), minlength=256)
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum() + 0.0)


def floor_bytes(numel: int, entropy_bits: float) -> float:
    """Order-0 lossless floor in bytes for numel BF16 weights: SM raw (1 B) + H/8 B of exponent."""
    return numel * (8.0 + entropy_bits) / 8.0
