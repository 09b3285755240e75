"""Planes and merge: the fast kernels against the numpy reference, every BF16 bit pattern."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zipmoe.codec import merge_into, merge_reference, split_bf16, split_into
from zipmoe.errors import CodecError

ALL_U16 = np.arange(65536, dtype=np.uint16)


def test_split_merge_exhaustive_all_65536_patterns():
    sm, exp = split_bf16(ALL_U16)
    assert np.array_equal(exp, (ALL_U16 >> 7).astype(np.uint8))  # includes ±0, subnormals, ±inf, NaNs
    assert np.array_equal(sm >> 7, ALL_U16 >> 15)
    assert np.array_equal(sm & 0x7F, ALL_U16 & 0x7F)
    assert np.array_equal(merge_reference(sm, exp), ALL_U16)
    out = np.empty(65536, np.uint16)
    merge_into(sm, exp, out)
    assert np.array_equal(out, ALL_U16)


def test_merge_into_every_sm_exp_pair():
    sm = np.repeat(np.arange(256, dtype=np.uint8), 256)
    exp = np.tile(np.arange(256, dtype=np.uint8), 256)
    out = np.empty(sm.size, np.uint16)
    merge_into(sm, exp, out)
    assert np.array_equal(out, merge_reference(sm, exp))
    assert np.unique(out).size == 65536  # the merge is a bijection


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=3000), st.integers(0, 255))
def test_merge_into_matches_reference_random(data: bytes, fill: int):
    u16 = np.frombuffer(data[: len(data) // 2 * 2], np.uint16)
    sm, exp = split_bf16(u16)
    out = np.full(u16.size + 2, fill, np.uint16)  # guard elements around the target slice
    merge_into(sm, exp, out[1:-1])
    assert np.array_equal(out[1:-1], u16)
    assert out[0] == fill and out[-1] == fill


def test_split_into_fills_caller_buffers_and_accepts_views():
    u16 = np.arange(1000, dtype=np.uint16).reshape(10, 100)
    sm, exp = split_bf16(u16)  # 2-D input is flattened
    sm2, exp2 = np.empty(1000, np.uint8), np.empty(1000, np.uint8)
    split_into(u16.reshape(-1), sm2, exp2)
    assert np.array_equal(sm, sm2) and np.array_equal(exp, exp2)


@pytest.mark.parametrize(
    "args",
    [
        (np.zeros(4, np.float32), np.zeros(4, np.uint8), np.zeros(4, np.uint8)),
        (np.zeros(4, np.uint16), np.zeros(3, np.uint8), np.zeros(4, np.uint8)),
        (np.zeros(8, np.uint16)[::2], np.zeros(4, np.uint8), np.zeros(4, np.uint8)),
    ],
)
def test_split_into_rejects_bad_buffers(args):
    with pytest.raises(CodecError):
        split_into(*args)


def test_merge_into_rejects_bad_buffers():
    with pytest.raises(CodecError, match="sizes differ"):
        merge_into(np.zeros(4, np.uint8), np.zeros(4, np.uint8), np.zeros(5, np.uint16))
    with pytest.raises(CodecError, match="uint16"):
        merge_into(np.zeros(4, np.uint8), np.zeros(4, np.uint8), np.zeros(4, np.int32))
