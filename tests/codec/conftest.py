"""Shared inputs for codec tests: BF16 conversion without torch and adversarial exponent planes."""

from __future__ import annotations

import numpy as np
import pytest

from zipmoe.codec import available_coders, get_coder


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> BF16 bits by round-to-nearest-even (finite inputs)."""
    u = np.asarray(x, np.float32).view(np.uint32)
    return ((u + ((u >> 16) & 1) + 0x7FFF) >> 16).astype(np.uint16)


def gaussian_bf16(n: int, sigma: float = 0.02, seed: int = 0) -> np.ndarray:
    """BF16 bits of N(0, sigma) weights: their exponents look like trained weights'."""
    return to_bf16_bits(np.random.default_rng(seed).normal(0.0, sigma, n).astype(np.float32))


def adversarial_planes() -> dict[str, np.ndarray]:
    """Exponent planes that stress the coders' edge cases (names say which)."""
    rng = np.random.default_rng(7)
    fib = np.concatenate([np.full(f, s, np.uint8) for s, f in enumerate([1, 1, 2, 3, 5, 8, 13, 21, 34, 55,
                                                                          89, 144, 233, 377, 610, 987, 1597,
                                                                          2584, 4181, 6765, 10946])])
    return {
        "empty": np.empty(0, np.uint8),
        "one": np.array([131], np.uint8),
        "two_equal": np.array([0, 0], np.uint8),
        "two_distinct": np.array([0, 255], np.uint8),
        "three": np.array([1, 2, 3], np.uint8),
        "const_0": np.zeros(5000, np.uint8),
        "const_255": np.full(70000, 255, np.uint8),
        "two_symbols_skewed": (rng.random(50000) < 0.001).astype(np.uint8) * 255,
        "uniform_256": rng.integers(0, 256, 100000, dtype=np.uint8),
        "all_bytes_sorted": np.repeat(np.arange(256, dtype=np.uint8), 300),
        "fibonacci_deep_tree": rng.permutation(fib),  # unlimited Huffman lengths exceed 12 bits
        "geometric": np.minimum(rng.geometric(0.3, 200000), 255).astype(np.uint8),
        "gaussian_exponents": ((gaussian_bf16(300000) >> 7) & 0xFF).astype(np.uint8),
        "odd_length_tail": ((gaussian_bf16(100003, seed=3) >> 7) & 0xFF).astype(np.uint8),
    }


@pytest.fixture(params=available_coders())
def coder(request):
    """Every registered coder, default parameters."""
    return get_coder(request.param)
