"""`huffman`: our table-driven canonical Huffman exponent coder (the default).

Why: the exponent plane of trained BF16 weights has ~2.6 bits of order-0 entropy and no useful
repetition, so an order-0 entropy coder gets within ~0.5 % of the floor, encodes at memory-ish speed
and decodes with one table lookup per ~3.5 symbols (zstd L19 gets the ratio at ~1 MB/s encode).

Payload (little-endian), self-contained:
    u8 version (=1) | u8 mode | u64 n
    mode 0 RAW:     n bytes (used when coding would not be smaller, e.g. tiny or flat planes)
    mode 1 CONST:   u8 value (every exponent equal)
    mode 2 HUFFMAN: u8 first, u8 last (symbol range with a code), ceil((last-first+1)/2) bytes of 4-bit
                    code lengths (low nibble first; 0 = unused; lengths <= 12 and a complete code),
                    u32 x 4 stream byte lengths, then the 4 streams. Stream s codes symbols
                    [s*n//4, (s+1)*n//4), LSB-first, canonical codes, zero-padded to a byte.
The total length must match exactly; anything else is a CodecError.
"""

from __future__ import annotations

import functools
import heapq
import struct
from typing import Any

import numpy as np

from zipmoe.codec.coders import _huffman_kernels as K
from zipmoe.codec.coders.base import Payload, as_u8, check_exp, check_merge_args, check_out, scratch_u8
from zipmoe.codec.merge import merge_into, merge_offset
from zipmoe.errors import CodecError

VERSION = 1
MODE_RAW, MODE_CONST, MODE_HUFFMAN = 0, 1, 2
_HEAD = struct.Struct("<BBQ")
_SIZES = struct.Struct("<4I")
_RANGE = struct.Struct("<BB")
_EMPTY_U16 = np.empty(0, np.uint16)
_ERRORS = {
    K.ERR_KRAFT: "code lengths do not form a complete prefix code",
    K.ERR_STREAM_END: "a bitstream does not end at its recorded length",
    K.ERR_PADDING: "nonzero padding bits after a bitstream",
    K.ERR_BOUNDS: "stream offsets fall outside the payload",
}


def huffman_lengths(hist: np.ndarray) -> np.ndarray:
    """Optimal (unlimited) Huffman code lengths per symbol; 0 for unused symbols, needs >= 2 used."""
    used = [int(s) for s in np.flatnonzero(hist)]
    heap = [(int(hist[s]), i) for i, s in enumerate(used)]
    parent = list(range(len(used)))
    heapq.heapify(heap)
    while len(heap) > 1:
        (wa, a), (wb, b) = heapq.heappop(heap), heapq.heappop(heap)
        node = len(parent)
        parent.append(node)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (wa + wb, node))
    depth = [0] * len(parent)
    for node in range(len(parent) - 2, -1, -1):  # parents are created after their children
        depth[node] = depth[parent[node]] + 1
    lens = np.zeros(256, np.int64)
    lens[used] = depth[: len(used)]
    return lens


def limit_lengths(lens: np.ndarray, hist: np.ndarray, limit: int = K.MAX_BITS) -> np.ndarray:
    """Clamp code lengths to `limit` and return a complete code (Kraft sum exactly 1).

    Overfull after clamping: lengthen the rarest codes below the limit. Underfull: shorten the most
    frequent of the longest codes; the slack is a multiple of their weight, so this ends exact."""
    lens = np.minimum(lens, limit)
    used = np.flatnonzero(lens)
    full = 1 << limit
    kraft = int(sum(1 << (limit - int(lens[s])) for s in used))
    by_rarity = sorted(used, key=lambda s: (int(hist[s]), int(s)))
    while kraft > full:
        for s in by_rarity:
            if lens[s] < limit and kraft > full:
                kraft -= 1 << (limit - int(lens[s]) - 1)
                lens[s] += 1
    while kraft < full:
        longest = int(lens[used].max())
        s = max((s for s in used if lens[s] == longest), key=lambda s: (int(hist[s]), -int(s)))
        kraft += 1 << (limit - longest)
        lens[s] -= 1
    return lens.astype(np.uint8)


def code_lengths(hist: np.ndarray) -> np.ndarray:
    """Length-limited (<= 12 bits) complete Huffman code lengths for a histogram with >= 2 symbols."""
    return limit_lengths(huffman_lengths(hist), hist)


class HuffmanCoder:
    """Canonical Huffman, 4 interleaved streams, 12-bit multi-symbol decode tables (numba, nogil)."""

    codec_id = "huffman"

    def params(self) -> dict[str, Any]:
        """No tunables: the code is fitted to each shard."""
        return {}

    def encode(self, exp: np.ndarray, lengths: np.ndarray | None = None) -> bytes:
        """Pick the smallest of RAW / CONST / HUFFMAN for this shard (deterministic).

        lengths: a code shared by the shards of one expert (see encode_shards); default: fitted here."""
        exp = check_exp(exp)
        n = exp.size
        hist = K.histogram(exp)
        used = np.flatnonzero(hist)
        if used.size == 1:
            return _HEAD.pack(VERSION, MODE_CONST, n) + bytes([int(used[0])])
        raw = _HEAD.pack(VERSION, MODE_RAW, n) + exp.tobytes()
        if n == 0:
            return raw
        if lengths is None or not np.all(lengths[used]):
            lengths = code_lengths(hist)
        return _pack(exp, hist, lengths, raw)

    def encode_shards(self, exp: np.ndarray, bounds: list[tuple[int, int]]) -> list[bytes]:
        """Shards of one expert under one code fitted to the whole expert: decoders then build its
        table once per expert, not once per shard (that costs ~30 µs; small shards notice)."""
        exp = check_exp(exp)
        hist = K.histogram(exp)
        lengths = code_lengths(hist) if np.count_nonzero(hist) >= 2 else None
        return [self.encode(exp[a:b], lengths) for a, b in bounds]

    def decode_into(self, payload: Payload, out: np.ndarray) -> None:
        """Decode one shard into caller-owned exponents (exactly n of them)."""
        buf = as_u8(payload)
        mode, n, body = _parse_head(buf)
        check_out(out, n, self.codec_id)
        if mode == MODE_HUFFMAN:
            _decode(buf, body, n, out, None, None)
        elif mode == MODE_CONST:
            out[:] = buf[body]
        else:
            out[:] = buf[body : body + n]

    def decode_merge_into(self, payload: Payload, sm: np.ndarray, out_u16: np.ndarray) -> None:
        """Fused: decode and merge in L1-sized rounds, writing BF16 bits straight into out_u16."""
        check_merge_args(sm, out_u16)
        buf = as_u8(payload)
        mode, n, body = _parse_head(buf)
        if out_u16.size != n:
            raise CodecError(f"huffman payload holds {n} exponents but out_u16 has room for {out_u16.size}")
        if mode == MODE_HUFFMAN:
            _decode(buf, body, n, scratch_u8(n), sm, out_u16)
            return
        if mode == MODE_CONST:
            exp = scratch_u8(n)
            exp[:] = buf[body]
            merge_into(sm, exp, out_u16)
        else:
            merge_offset(sm, buf, body, out_u16, n)

def _pack(exp: np.ndarray, hist: np.ndarray, lens: np.ndarray, raw: bytes) -> bytes:
    """The HUFFMAN payload of exp under code lengths lens, or raw when that is not smaller."""
    n = exp.size
    coded = np.flatnonzero(lens)
    first, last = int(coded[0]), int(coded[-1])
    coded_bits = int(np.dot(hist, lens.astype(np.int64)))
    if coded_bits // 8 + 40 + (last - first) // 2 >= n:
        return raw
    codes = np.empty(256, np.uint32)
    if K.canonical_codes(lens, codes) != 0:
        raise AssertionError("limit_lengths returned an incomplete code")
    buf = np.empty(n * K.MAX_BITS // 8 + 8 * K.NSTREAMS + 8, np.uint8)
    sizes = K.encode_streams(exp, codes, lens, buf)
    span = np.zeros((last - first + 2) // 2 * 2, np.uint8)
    span[: last - first + 1] = lens[first : last + 1]
    table = (span[0::2] | (span[1::2] << 4)).astype(np.uint8).tobytes()
    return b"".join((_HEAD.pack(VERSION, MODE_HUFFMAN, n), bytes([first, last]), table,
                     _SIZES.pack(*(int(x) for x in sizes)), buf[: int(sizes.sum())].tobytes()))


def _parse_head(buf: np.ndarray) -> tuple[int, int, int]:
    """(mode, n, offset of the mode's body); checks the total length for RAW and CONST."""
    if buf.size < _HEAD.size:
        raise CodecError(f"huffman payload truncated: {buf.size} bytes, the header alone needs {_HEAD.size}")
    version, mode, n = _HEAD.unpack_from(buf, 0)
    if version != VERSION:
        raise CodecError(f"huffman payload version {version} is not supported (this build reads {VERSION})")
    body = _HEAD.size
    expected = {MODE_RAW: body + n, MODE_CONST: body + 1}.get(mode)
    if mode not in (MODE_RAW, MODE_CONST, MODE_HUFFMAN):
        raise CodecError(f"huffman payload has unknown mode {mode}: corrupt chunk")
    if expected is not None and buf.size != expected:
        raise CodecError(f"huffman payload is {buf.size} bytes, its header implies {expected}: corrupt chunk")
    return mode, n, body


def _decode(buf: np.ndarray, body: int, n: int, exp: np.ndarray, sm: np.ndarray | None,
            out_u16: np.ndarray | None) -> None:
    """Parse the HUFFMAN body, fetch tables, run the 4-stream kernel (merging if sm is given).

    Plain ints and struct here: this runs once per shard and small shards are overhead-bound."""
    if buf.size < body + 2:
        raise CodecError("huffman payload truncated inside its code-length table")
    first, last = _RANGE.unpack_from(buf, body)
    if last < first:
        raise CodecError(f"huffman payload has symbol range {first}..{last}: corrupt chunk")
    tab = body + 2
    streams = tab + (last - first + 2) // 2 + _SIZES.size
    if buf.size < streams:
        raise CodecError("huffman payload truncated inside its header")
    single, multi = _tables(first, last, buf[tab : streams - _SIZES.size].tobytes())
    s0, s1, s2, s3 = _SIZES.unpack_from(buf, streams - _SIZES.size)
    bounds = (streams, streams + s0, streams + s0 + s1, streams + s0 + s1 + s2, streams + s0 + s1 + s2 + s3)
    if bounds[4] != buf.size:
        raise CodecError(f"huffman payload is {buf.size} bytes, its header implies {bounds[4]}: corrupt")
    if n > buf.size * 8:  # every symbol costs at least one bit
        raise CodecError(f"huffman payload claims {n} symbols in {buf.size} bytes: corrupt chunk")
    if sm is None or out_u16 is None:  # same argument types either way: one compiled kernel
        rc = K.decode4(buf, bounds, single, multi, exp, n, exp, _EMPTY_U16, False)
    else:
        rc = K.decode4(buf, bounds, single, multi, exp, n, sm, out_u16, True)
    if rc != 0:
        raise CodecError(f"huffman payload is corrupt: {_ERRORS.get(rc, f'error {rc}')}")


@functools.lru_cache(maxsize=64)
def _tables(first: int, last: int, nibbles: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Decode tables for one code-length table (40 KiB; shards of one tensor mostly share a code)."""
    nib = np.frombuffer(nibbles, np.uint8)
    lens = np.zeros(256, np.uint8)
    lens[first : last + 1] = np.stack([nib & 0xF, nib >> 4], axis=1).reshape(-1)[: last - first + 1]
    single = np.zeros(1 << K.MAX_BITS, np.uint16)
    multi = np.zeros(1 << K.MAX_BITS, np.uint64)
    rc = K.build_tables(lens, single, multi)
    if rc != 0:
        raise CodecError(f"huffman payload is corrupt: {_ERRORS.get(rc, f'error {rc}')}")
    single.flags.writeable = False
    multi.flags.writeable = False
    return single, multi
