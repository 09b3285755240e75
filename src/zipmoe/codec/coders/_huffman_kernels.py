"""numba kernels of the canonical Huffman exponent coder (format: huffman.py).

n=symbols (exponent bytes) T=table bits (= max code length) S=4 interleaved streams.
Bits are read LSB-first; each stream is a contiguous quarter of the shard. The decoder peeks T bits
and one lookup in a 2^T table yields up to 6 symbols (multi-symbol entries): with ~2.6-bit codes that
is ~4.1-4.5 symbols per lookup. numba has no bounds checks, so every kernel here validates positions
itself and returns an error code (< 0) instead of touching memory out of range.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic

from zipmoe.codec._jit import kernel
from zipmoe.codec.merge import merge_range

NSTREAMS = 4
MAX_BITS = 12  # code length limit == decode table bits: 4096 x 8 B multi table stays in L1
MULTI_SYMBOLS = 6  # symbols per multi-table entry (48 bits); ~4.1-4.5 decoded per lookup on weights
ROUND_ITERS = 64  # fast-loop iterations between merges: ~1100 symbols/stream, L1-resident

# error codes returned by kernels (huffman.py turns them into CodecError messages)
ERR_KRAFT = -1  # code lengths do not form a complete prefix code
ERR_STREAM_END = -2  # a stream's bits do not end exactly at its recorded length
ERR_PADDING = -3  # nonzero padding bits after a stream's last symbol
ERR_BOUNDS = -4  # stream offsets outside the payload


@intrinsic
def _load_u64(typingctx, arr, idx):  # pragma: no cover - compiled
    """Unaligned little-endian 8-byte load at arr[idx:idx+8]; the caller guarantees idx+8 <= size."""
    sig = types.uint64(arr, idx)

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), ir.IntType(64).as_pointer())
        return builder.load(ptr, align=1)

    return sig, codegen


def _store_intrinsic(bits: int):
    """Unaligned store of the low `bits` bits of val at arr[idx:idx + bits/8]; caller checks bounds."""

    def store(typingctx, arr, idx, val):  # pragma: no cover - compiled
        sig = types.void(arr, idx, val)

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), ir.IntType(bits).as_pointer())
            val = args[2] if bits == 64 else builder.trunc(args[2], ir.IntType(bits))
            builder.store(val, ptr, align=1)
            return context.get_dummy_value()

        return sig, codegen

    store.__name__ = f"_store_u{bits}"
    return intrinsic(store)


_store_u32 = _store_intrinsic(32)
_store_u64 = _store_intrinsic(64)


@kernel
def histogram(exp):  # pragma: no cover - compiled
    """Symbol counts of a u8 plane (4 sub-histograms avoid store-to-load stalls on repeats)."""
    h = np.zeros((4, 256), np.int64)
    n4 = exp.size - exp.size % 4
    for i in range(0, n4, 4):
        h[0, exp[i]] += 1
        h[1, exp[i + 1]] += 1
        h[2, exp[i + 2]] += 1
        h[3, exp[i + 3]] += 1
    for i in range(n4, exp.size):
        h[0, exp[i]] += 1
    return h[0] + h[1] + h[2] + h[3]


@kernel
def canonical_codes(lens, codes):  # pragma: no cover - compiled
    """Fill codes[sym] with the bit-reversed (LSB-first) canonical code; 0 or ERR_KRAFT."""
    count = np.zeros(MAX_BITS + 1, np.int64)
    for s in range(256):
        if lens[s] > MAX_BITS:
            return ERR_KRAFT
        count[lens[s]] += 1
    kraft = 0
    for l in range(1, MAX_BITS + 1):
        kraft += count[l] << (MAX_BITS - l)
    if kraft != (1 << MAX_BITS):
        return ERR_KRAFT
    count[0] = 0  # unused symbols take no code space
    next_code = np.zeros(MAX_BITS + 1, np.int64)
    c = 0
    for l in range(1, MAX_BITS + 1):
        c = (c + count[l - 1]) << 1
        next_code[l] = c
    for s in range(256):
        l = lens[s]
        if l == 0:
            codes[s] = 0
            continue
        v = next_code[l]
        next_code[l] += 1
        r = 0
        for _ in range(l):  # reverse the l code bits: streams are read LSB-first
            r = (r << 1) | (v & 1)
            v >>= 1
        codes[s] = r
    return 0


@kernel
def encode_streams(exp, codes, lens, out):  # pragma: no cover - compiled
    """Write S LSB-first bitstreams back to back into out (sized by the caller: n*MAX_BITS/8 + 8*S).

    Returns the byte length of each stream (int64[S])."""
    n = exp.size
    sizes = np.zeros(NSTREAMS, np.int64)
    table = np.empty(256, np.uint64)
    for s in range(256):
        table[s] = np.uint64(codes[s]) | (np.uint64(lens[s]) << np.uint64(32))
    p = 0
    for s in range(NSTREAMS):
        start = p
        acc = np.uint64(0)
        nacc = np.uint64(0)
        for i in range(s * n // NSTREAMS, (s + 1) * n // NSTREAMS):
            e = table[exp[i]]
            acc |= (e & np.uint64(0xFFFFFFFF)) << nacc
            nacc += e >> np.uint64(32)
            if nacc >= 32:
                _store_u32(out, p, acc)
                p += 4
                acc >>= np.uint64(32)
                nacc -= np.uint64(32)
        while nacc > 0:
            out[p] = np.uint8(acc & np.uint64(0xFF))
            p += 1
            acc >>= np.uint64(8)
            nacc = nacc - np.uint64(8) if nacc > 8 else np.uint64(0)
        sizes[s] = p - start
    return sizes


@kernel
def build_tables(lens, single, multi):  # pragma: no cover - compiled
    """Decode tables from code lengths: single[idx] = sym | len << 8, multi[idx] = up to 6 symbols
    (bytes 0-5) | bits consumed << 48 | symbol count << 56. 0 or ERR_KRAFT.

    multi is built level by level in O(2^(T+1)): the entry for j with r known bits is its first
    symbol (length l) followed by the entry for j >> l with r - l known bits."""
    codes = np.empty(256, np.uint32)
    rc = canonical_codes(lens, codes)
    if rc != 0:
        return rc
    size = 1 << MAX_BITS
    for s in range(256):
        l = lens[s]
        if l == 0:
            continue
        for idx in range(codes[s], size, 1 << l):
            single[idx] = np.uint16(s | (l << 8))
    syms = np.zeros(2 * size, np.uint64)  # level r, index j at (1 << r) - 1 + j
    cum = np.zeros(2 * size, np.uint32)  # nibble k: bits consumed by the first k + 1 symbols
    cnt = np.zeros(2 * size, np.uint8)
    for r in range(1, MAX_BITS + 1):
        base = np.uint64((1 << r) - 1)
        for j in range(np.uint64(1) << np.uint64(r)):  # unsigned indices: no wraparound checks
            e = single[j]  # zero-extended: valid while the first code fits in the r known bits
            l = np.uint64(e >> 8)
            if l > r:
                continue  # zeros: no symbol decodable from these r bits
            q = (np.uint64(1) << (np.uint64(r) - l)) - np.uint64(1) + (j >> l)
            syms[base + j] = (np.uint64(e & 0xFF) | (syms[q] << np.uint64(8))) & np.uint64(0xFFFFFFFFFFFF)
            cum[base + j] = (np.uint32(l) | ((cum[q] + np.uint32(l) * np.uint32(0x111111)) << np.uint32(4))) \
                & np.uint32(0xFFFFFF)
            cnt[base + j] = min(cnt[q] + np.uint8(1), np.uint8(MULTI_SYMBOLS))
    top = np.uint64(size - 1)
    for j in range(np.uint64(size)):
        k = np.uint32(cnt[top + j])
        bits = np.uint64((cum[top + j] >> (np.uint32(4) * (k - np.uint32(1)))) & np.uint32(0xF))
        multi[j] = syms[top + j] | (bits << np.uint64(48)) | (np.uint64(k) << np.uint64(56))
    return 0


@kernel
def _fast_step(payload, multi, exp_out, p, b, c, o):  # pragma: no cover - compiled
    """One refill + 4 multi-symbol lookups of one stream. Caller: p + 8 <= end, o + 26 <= stream end
    (the 4th lookup starts at most 18 symbols on and stores 8 bytes)."""
    b |= _load_u64(payload, p) << c
    p += (63 - c) >> 3
    c |= 56
    mask = np.uint64((1 << MAX_BITS) - 1)
    for _ in range(4):  # 4 x 12 bits <= 56 bits available after the refill
        e = multi[b & mask]
        nb = np.int64((e >> np.uint64(48)) & np.uint64(0xFF))
        _store_u64(exp_out, o, e)  # 8 bytes: the symbols, then junk the next lookup overwrites
        b >>= nb
        c -= nb
        o += np.int64(e >> np.uint64(56))
    return p, b, c, o


@kernel
def _safe_iters(p, end, o, oend):  # pragma: no cover - compiled
    """Fast steps that stay in bounds: each reads <= 8 B (advances <= 7), advances <= 24 symbols and
    writes below o + 26."""
    if end - p < 8 or oend - o < 26:
        return 0
    return min((end - p - 8) // 7 + 1, (oend - o - 26) // 24 + 1, ROUND_ITERS)


@kernel
def _tail(payload, single, exp_out, p, end, b, c, o, oend):  # pragma: no cover - compiled
    """Finish one stream symbol by symbol, reading zeros past its end; then check it ended exactly.

    Returns (error code, p, b, c)."""
    mask = np.uint64((1 << MAX_BITS) - 1)
    while True:
        while c <= 56:  # bytes past the end read as 0: a valid stream never uses them
            byte = payload[p] if p < end else np.uint8(0)
            b |= np.uint64(byte) << c
            p += 1
            c += 8
        if o >= oend:
            break
        e = single[b & mask]
        l = np.int64(e >> 8)
        exp_out[o] = np.uint8(e & 0xFF)
        o += 1
        b >>= l
        c -= l
    return 0, p, b, c


@kernel
def _stream_end_ok(start, end, p, b, c):  # pragma: no cover - compiled
    """A stream must end inside its last byte, followed only by zero padding bits."""
    consumed = (p - start) * 8 - c
    total = (end - start) * 8
    if consumed > total or (consumed <= total - 8 and total > 0) or (total == 0 and consumed != 0):
        return ERR_STREAM_END
    pad = total - consumed
    if pad > 0 and (b & np.uint64((1 << pad) - 1)) != 0:
        return ERR_PADDING
    return 0


@kernel
def decode4(payload, bounds, single, multi, exp_out, n, sm, out_u16, merge):  # pragma: no cover
    """Decode S=4 streams (payload[bounds[s]:bounds[s+1]], bounds a 5-tuple) into exp_out[:n]; if
    merge, also write out_u16[:n] = merge(sm, exp) round by round while the exponents are in L1.

    The fast loop's 8-byte stores stay below o + 26 <= the stream's end, so exp_out needs only n bytes.
    Returns 0 or an error code."""
    if bounds[0] < 0 or bounds[4] > payload.size or exp_out.size < n:
        return ERR_BOUNDS
    if bounds[0] > bounds[1] or bounds[1] > bounds[2] or bounds[2] > bounds[3] or bounds[3] > bounds[4]:
        return ERR_BOUNDS
    if merge and (sm.size < n or out_u16.size < n):
        return ERR_BOUNDS
    zero = np.uint64(0)
    p0, p1, p2, p3 = bounds[0], bounds[1], bounds[2], bounds[3]
    e0, e1, e2, e3 = bounds[1], bounds[2], bounds[3], bounds[4]
    o0, o1, o2, o3 = 0, n // 4, 2 * n // 4, 3 * n // 4
    q0, q1, q2, q3 = o1, o2, o3, n  # end of each stream's output
    b0, b1, b2, b3 = zero, zero, zero, zero
    c0, c1, c2, c3 = 0, 0, 0, 0
    while True:
        k = min(_safe_iters(p0, e0, o0, q0), _safe_iters(p1, e1, o1, q1),
                _safe_iters(p2, e2, o2, q2), _safe_iters(p3, e3, o3, q3))
        if k == 0:
            break
        m0, m1, m2, m3 = o0, o1, o2, o3
        for _ in range(k):
            p0, b0, c0, o0 = _fast_step(payload, multi, exp_out, p0, b0, c0, o0)
            p1, b1, c1, o1 = _fast_step(payload, multi, exp_out, p1, b1, c1, o1)
            p2, b2, c2, o2 = _fast_step(payload, multi, exp_out, p2, b2, c2, o2)
            p3, b3, c3, o3 = _fast_step(payload, multi, exp_out, p3, b3, c3, o3)
        if merge:
            merge_range(sm, exp_out, out_u16, m0, o0)
            merge_range(sm, exp_out, out_u16, m1, o1)
            merge_range(sm, exp_out, out_u16, m2, o2)
            merge_range(sm, exp_out, out_u16, m3, o3)
    rc = _finish(payload, bounds, single, exp_out, 0, p0, b0, c0, o0, q0, sm, out_u16, merge)
    if rc == 0:
        rc = _finish(payload, bounds, single, exp_out, 1, p1, b1, c1, o1, q1, sm, out_u16, merge)
    if rc == 0:
        rc = _finish(payload, bounds, single, exp_out, 2, p2, b2, c2, o2, q2, sm, out_u16, merge)
    if rc == 0:
        rc = _finish(payload, bounds, single, exp_out, 3, p3, b3, c3, o3, q3, sm, out_u16, merge)
    return rc


@kernel
def _finish(payload, bounds, single, exp_out, s, p, b, c, o, oend, sm, out_u16, merge):  # pragma: no cover
    """Tail of stream s, its end check, and the merge of what the tail decoded."""
    rc, p, b, c = _tail(payload, single, exp_out, p, bounds[s + 1], b, c, o, oend)
    if rc == 0:
        rc = _stream_end_ok(bounds[s], bounds[s + 1], p, b, c)
    if rc == 0 and merge:
        merge_range(sm, exp_out, out_u16, o, oend)
    return rc
