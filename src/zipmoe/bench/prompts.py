"""A fixed, seeded prompt set shaped like chat traffic, as token ids (no tokenizer needed).

bench stage: (vocab size, n, seed) → n prompts. Lengths follow a log-normal fitted by eye to chat
traffic (median 128 tokens, σ = 1.0 in log space: p10 ≈ 36, p90 ≈ 460) truncated to [8, 1024]; the n
lengths are the distribution's stratified quantiles (i + ½)/n in a seeded order, so even 8 prompts
cover short to long. Each request asks for 64–128 new tokens. Token ids are uniform over the
vocabulary minus `exclude_ids` (e.g. EOS, so no prompt ends early by accident). Deterministic in all
arguments; only numpy's PCG64 and the standard library are used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from zipmoe.errors import ZipMoEError


@dataclass(frozen=True, slots=True)
class Prompt:
    """One benchmark request."""

    index: int  # position in the prompt set
    token_ids: tuple[int, ...]  # prompt tokens, ids in [0, vocab_size)
    max_new_tokens: int  # tokens to generate (64–128 by default)

    def __len__(self) -> int:
        return len(self.token_ids)


def chat_lengths(n: int, *, seed: int = 0, median: float = 128.0, sigma: float = 1.0, min_len: int = 8,
                 max_len: int = 1024) -> list[int]:
    """n prompt lengths: stratified quantiles of a log-normal truncated to [min_len, max_len], shuffled."""
    if n <= 0 or not (1 <= min_len <= max_len) or sigma <= 0 or median <= 0:
        raise ZipMoEError(f"need n > 0, 1 ≤ min_len ≤ max_len, sigma > 0, median > 0; got n={n}, "
                          f"min_len={min_len}, max_len={max_len}, sigma={sigma}, median={median}")
    z = NormalDist()
    lo, hi = (z.cdf((math.log(x) - math.log(median)) / sigma) for x in (min_len, max_len))
    qs = [lo + (hi - lo) * (i + 0.5) / n for i in range(n)]
    lengths = [min(max_len, max(min_len, round(median * math.exp(sigma * z.inv_cdf(q))))) for q in qs]
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,))).permutation(n)
    return [lengths[i] for i in order]


def prompt_set(vocab_size: int, n: int = 32, *, seed: int = 0, new_tokens: tuple[int, int] = (64, 128),
               exclude_ids: tuple[int, ...] = (), min_len: int = 8, max_len: int = 1024) -> list[Prompt]:
    """The benchmark's prompts: chat-like lengths (see chat_lengths), max_new_tokens uniform in new_tokens."""
    lo_new, hi_new = new_tokens
    if not (1 <= lo_new <= hi_new):
        raise ZipMoEError(f"new_tokens must be (low, high) with 1 ≤ low ≤ high, got {new_tokens}")
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(exclude_ids, dtype=np.int64))
    if vocab_size <= 0 or allowed.size == 0:
        raise ZipMoEError(f"no token ids left to sample: vocab_size={vocab_size}, exclude_ids={exclude_ids}")
    lengths = chat_lengths(n, seed=seed, min_len=min_len, max_len=max_len)
    prompts = []
    for i, length in enumerate(lengths):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, i)))
        ids = allowed[rng.integers(0, allowed.size, size=length)]
        new = int(rng.integers(lo_new, hi_new + 1))
        prompts.append(Prompt(i, tuple(int(x) for x in ids), new))
    return prompts
