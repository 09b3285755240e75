"""Sharding of one expert's exponent plane and the entropy helper used by `inspect`."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.codec.conftest import gaussian_bf16
from zipmoe.codec import encode_expert, exponent_entropy, get_coder, shard_bounds
from zipmoe.codec.shards import MIN_SHARD, SHARD_ALIGN
from zipmoe.errors import CodecError


@given(numel=st.integers(0, 10**9), k=st.integers(1, 256))
def test_shard_bounds_cover_contiguously(numel, k):
    bounds = shard_bounds(numel, k)
    assert bounds == shard_bounds(numel, k)  # deterministic
    assert bounds[0][0] == 0 and bounds[-1][1] == numel
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert 1 <= len(bounds) <= k
    if len(bounds) > 1:
        assert all(b - a >= MIN_SHARD for a, b in bounds[:-1])
        assert all(a % SHARD_ALIGN == 0 for a, _ in bounds)
        assert all(b > a for a, b in bounds)


def test_shard_bounds_tiny_and_exact():
    assert shard_bounds(0, 8) == [(0, 0)]
    assert shard_bounds(1, 8) == [(0, 1)]
    assert len(shard_bounds(MIN_SHARD * 8, 8)) == 8
    assert len(shard_bounds(MIN_SHARD * 8 - 1, 8)) == 7


@pytest.mark.parametrize("numel,k", [(-1, 2), (10, 0), (10, 1.5), (True, 2)])
def test_shard_bounds_rejects_bad_arguments(numel, k):
    with pytest.raises(CodecError):
        shard_bounds(numel, k)


@pytest.mark.parametrize("cid", ["huffman", "zstd"])
def test_encode_expert_shards_decode_into_their_slices(cid):
    u16 = gaussian_bf16(300_017, seed=2)
    coder = get_coder(cid)
    sm, shards = encode_expert(u16, coder, 4)
    bounds = shard_bounds(u16.size, 4)
    assert len(shards) == len(bounds) == 4
    out = np.empty(u16.size, np.uint16)
    for (a, b), payload in zip(bounds, shards, strict=True):
        coder.decode_merge_into(payload, sm[a:b], out[a:b])
    assert np.array_equal(out, u16)


def test_encode_expert_rejects_non_bf16():
    with pytest.raises(CodecError, match="uint16"):
        encode_expert(np.zeros(10, np.float32), get_coder("raw"), 2)


def test_exponent_entropy_known_values():
    assert exponent_entropy(np.empty(0, np.uint8)) == 0.0
    assert exponent_entropy(np.full(100, 5, np.uint8)) == 0.0
    assert exponent_entropy(np.arange(256, dtype=np.uint8)) == pytest.approx(8.0)
    assert exponent_entropy(np.array([1, 2, 3, 4], np.uint8)) == pytest.approx(2.0)
    e = ((gaussian_bf16(1 << 18) >> 7) & 0xFF).astype(np.uint8)
    assert 2.3 < exponent_entropy(e) < 2.8  # sigma=0.02 Gaussian: ~2.55 bits (DESIGN.md)


def test_importing_zipmoe_compiles_nothing():
    """Kernels compile at first use; importing zipmoe (or zipmoe.codec) must not run numba."""
    import subprocess
    import sys

    code = ("import sys, zipmoe; assert 'numba' not in sys.modules; import zipmoe.codec as c; "
            "from zipmoe.codec.merge import merge_offset; assert not merge_offset.signatures")
    subprocess.run([sys.executable, "-c", code], check=True)
