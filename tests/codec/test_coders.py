"""Every exponent coder: bit-exact round trips on random and adversarial planes, corrupt payloads
raise CodecError (never crash, never write outside `out`), registry errors."""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.codec.conftest import adversarial_planes, gaussian_bf16
from zipmoe.codec import available_coders, get_coder, merge_reference, split_bf16
from zipmoe.errors import CodecError

PLANES = adversarial_planes()
GUARD = 7  # sentinel elements each side of every output buffer


def guarded(n: int, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """(backing array with sentinels, the n-element view a decoder may write)."""
    back = np.full(n + 2 * GUARD, 0xA5, dtype)
    return back, back[GUARD : GUARD + n]


def assert_guards_intact(back: np.ndarray) -> None:
    assert np.all(back[:GUARD] == 0xA5) and np.all(back[-GUARD:] == 0xA5), "decoder wrote out of bounds"


def roundtrip(coder, exp: np.ndarray, sm: np.ndarray | None = None) -> None:
    """decode_into and decode_merge_into both reproduce the input exactly, within their buffers."""
    payload = coder.encode(exp)
    back, out = guarded(exp.size, np.uint8)
    coder.decode_into(payload, out)
    assert np.array_equal(out, exp)
    assert_guards_intact(back)
    if sm is None:
        sm = np.random.default_rng(exp.size).integers(0, 256, exp.size, dtype=np.uint8)
    back16, out16 = guarded(exp.size, np.uint16)
    coder.decode_merge_into(np.frombuffer(payload, np.uint8), sm, out16)  # ndarray payloads too
    assert np.array_equal(out16, merge_reference(sm, exp))
    assert_guards_intact(back16)


@pytest.mark.parametrize("name", sorted(PLANES))
def test_roundtrip_adversarial(coder, name):
    roundtrip(coder, PLANES[name])


def test_roundtrip_all_65536_bf16_patterns(coder):
    u16 = np.random.default_rng(1).permutation(np.arange(65536, dtype=np.uint16))
    sm, exp = split_bf16(u16)
    payload = coder.encode(exp)
    out16 = np.empty(65536, np.uint16)
    coder.decode_merge_into(payload, sm, out16)
    assert np.array_equal(out16, u16)


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=6000), name=st.sampled_from(available_coders()))
def test_roundtrip_random_bytes(data, name):
    roundtrip(get_coder(name), np.frombuffer(data, np.uint8))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 20000),
    alphabet=st.lists(st.integers(0, 255), min_size=1, max_size=40, unique=True),
    skew=st.floats(0.05, 3.0),
    seed=st.integers(0, 2**32 - 1),
    name=st.sampled_from(available_coders()),
)
def test_roundtrip_skewed_alphabets(n, alphabet, skew, seed, name):
    rng = np.random.default_rng(seed)
    p = np.exp(-skew * np.arange(len(alphabet)))
    exp = np.array(alphabet, np.uint8)[rng.choice(len(alphabet), n, p=p / p.sum())]
    roundtrip(get_coder(name), exp)


def test_params_rebuild_an_equivalent_coder(coder):
    exp = PLANES["gaussian_exponents"]
    twin = get_coder(coder.codec_id, **coder.params())
    out = np.empty(exp.size, np.uint8)
    twin.decode_into(coder.encode(exp), out)
    assert np.array_equal(out, exp)
    assert twin.encode(exp) == coder.encode(exp)  # deterministic


@pytest.mark.parametrize("params", [{"level": 1}, {"level": 19}, {"level": 3, "min_match": 7}, {"level": -3}])
def test_zstd_levels_and_min_match(params):
    roundtrip(get_coder("zstd", **params), PLANES["gaussian_exponents"][:50000])


def test_truncated_payloads_raise(coder):
    exp = PLANES["gaussian_exponents"][:3000]
    payload = coder.encode(exp)
    cuts = sorted({*range(0, min(len(payload), 64)), *range(len(payload) - 40, len(payload))})
    for cut in cuts:
        if coder.codec_id == "raw":  # raw has no header: a short payload is a short plane
            continue
        back, out = guarded(exp.size, np.uint8)
        with pytest.raises(CodecError):
            coder.decode_into(payload[:cut], out)
        assert_guards_intact(back)


def test_wrong_output_size_raises(coder):
    payload = coder.encode(PLANES["geometric"][:1000])
    with pytest.raises(CodecError):
        coder.decode_into(payload, np.empty(999, np.uint8))
    with pytest.raises(CodecError):
        coder.decode_merge_into(payload, np.zeros(1001, np.uint8), np.empty(1001, np.uint16))
    with pytest.raises(CodecError):
        coder.decode_merge_into(payload, np.zeros(1000, np.uint8), np.empty(999, np.uint16))


def test_bad_inputs_raise(coder):
    with pytest.raises(CodecError):
        coder.encode(np.zeros(10, np.uint16))
    with pytest.raises(CodecError):
        coder.decode_into(12345, np.empty(1, np.uint8))


@settings(max_examples=150, deadline=None)
@given(pos=st.integers(0, 10**9), bit=st.integers(0, 7), name=st.sampled_from(["huffman", "zstd", "lz4"]))
def test_bit_flips_never_crash_or_write_out_of_bounds(pos, bit, name):
    """A flipped bit either raises CodecError or decodes to some plane of the right size (the store's
    checksums catch those); never a crash, never a write outside the buffers."""
    coder = get_coder(name)
    exp = PLANES["odd_length_tail"][:20000]
    payload = bytearray(coder.encode(exp))
    payload[pos % len(payload)] ^= 1 << bit
    back, out = guarded(exp.size, np.uint8)
    back16, out16 = guarded(exp.size, np.uint16)
    sm = np.zeros(exp.size, np.uint8)
    for call in (lambda: coder.decode_into(bytes(payload), out),
                 lambda: coder.decode_merge_into(bytes(payload), sm, out16)):
        with contextlib.suppress(CodecError):
            call()
    assert_guards_intact(back)
    assert_guards_intact(back16)


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=400), n=st.integers(0, 3000), name=st.sampled_from(["huffman", "zstd", "lz4"]))
def test_garbage_payloads_only_raise_codec_error(data, n, name):
    back, out = guarded(n, np.uint8)
    with contextlib.suppress(CodecError):
        get_coder(name).decode_into(data, out)
    assert_guards_intact(back)


def test_concurrent_decodes_are_independent(coder):
    """Per-thread scratch and contexts: two threads decoding different shards get their own results."""
    planes = [PLANES["gaussian_exponents"], PLANES["geometric"]]
    payloads = [coder.encode(p) for p in planes]
    errors: list[str] = []

    def work(i: int) -> None:
        sm = np.zeros(planes[i].size, np.uint8)
        out = np.empty(planes[i].size, np.uint16)
        for _ in range(20):
            coder.decode_merge_into(payloads[i], sm, out)
            if not np.array_equal(out, planes[i].astype(np.uint16) << 7):
                errors.append(f"thread {i} got a wrong result")

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_registry_unknown_id_lists_available():
    with pytest.raises(CodecError) as info:
        get_coder("brotli")
    for cid in ("huffman", "zstd", "lz4", "raw"):
        assert cid in str(info.value)


@pytest.mark.parametrize(
    "cid,params",
    [("zstd", {"level": 99}), ("zstd", {"min_match": 2}), ("zstd", {"window": 3}), ("huffman", {"bits": 11}),
     ("lz4", {"acceleration": 0}), ("raw", {"x": 1})],
)
def test_registry_bad_params(cid, params):
    with pytest.raises(CodecError):
        get_coder(cid, **params)


def test_default_coder_first_and_protocol():
    from zipmoe.codec import DEFAULT_CODER, ExponentCoder

    assert available_coders()[0] == DEFAULT_CODER == "huffman"
    for cid in available_coders():
        assert isinstance(get_coder(cid), ExponentCoder)


def test_gaussian_bf16_full_roundtrip_through_every_coder(coder):
    u16 = gaussian_bf16(200001, seed=5)
    sm, exp = split_bf16(u16)
    out = np.empty(u16.size, np.uint16)
    coder.decode_merge_into(coder.encode(exp), sm, out)
    assert np.array_equal(out, u16)
