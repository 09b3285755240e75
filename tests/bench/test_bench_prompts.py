"""The prompt set is fixed, chat-shaped and valid for the model's vocabulary."""

from __future__ import annotations

import numpy as np
import pytest

from zipmoe.bench.prompts import chat_lengths, prompt_set
from zipmoe.errors import ZipMoEError


def test_deterministic_and_seeded() -> None:
    a, b = prompt_set(1000, 16, seed=3), prompt_set(1000, 16, seed=3)
    assert a == b
    assert a != prompt_set(1000, 16, seed=4)


def test_chat_like_lengths_and_valid_ids() -> None:
    prompts = prompt_set(151936, 64, exclude_ids=(151643,))
    lengths = np.array([len(p) for p in prompts])
    assert lengths.min() >= 8 and lengths.max() <= 1024
    assert 90 <= np.median(lengths) <= 170  # median ~128 tokens
    assert lengths.min() < 32 and lengths.max() > 600  # short to ~1k
    assert all(64 <= p.max_new_tokens <= 128 for p in prompts)
    ids = np.concatenate([p.token_ids for p in prompts])
    assert ids.min() >= 0 and ids.max() < 151936 and not np.any(ids == 151643)
    assert [p.index for p in prompts] == list(range(64))


def test_few_prompts_still_span_lengths() -> None:
    lengths = chat_lengths(8)
    assert min(lengths) < 40 and max(lengths) > 400
    assert sorted(lengths) != lengths  # shuffled, so batches mix short and long


def test_tiny_vocab_and_bad_input() -> None:
    prompts = prompt_set(3, 4, exclude_ids=(0, 1))
    assert all(set(p.token_ids) == {2} for p in prompts)
    with pytest.raises(ZipMoEError, match="no token ids"):
        prompt_set(2, 4, exclude_ids=(0, 1))
    with pytest.raises(ZipMoEError, match="new_tokens"):
        prompt_set(100, 4, new_tokens=(10, 5))
    with pytest.raises(ZipMoEError, match="n > 0"):
        chat_lengths(0)
