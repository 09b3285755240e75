"""The ExponentCoder contract and helpers shared by every coder.

n=symbols of one exponent shard. encode: exp u8[n] -> payload bytes (self-contained: it records n).
decode_into: payload -> exp u8[n]; decode_merge_into: payload + sm u8[n] -> BF16 bits u16[n].
Decoders release the GIL (numba nogil / C extensions) so W decode workers scale with threads.
Corrupt or truncated payloads raise CodecError; they never crash or write outside `out`.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol, runtime_checkable

import numpy as np

from zipmoe.codec.merge import merge_into
from zipmoe.codec.planes import check_vector
from zipmoe.errors import CodecError

Payload = np.ndarray | bytes | bytearray | memoryview


@runtime_checkable
class ExponentCoder(Protocol):
    """Codes one exponent shard. A coder may later offer a GPU decoder; the store records codec_id."""

    codec_id: str  # registry key, recorded per chunk by the store

    def params(self) -> dict[str, Any]:
        """Parameters that, with codec_id, rebuild an equivalent coder via get_coder(id, **params)."""
        ...

    def encode(self, exp: np.ndarray) -> bytes:
        """Compress a 1-D uint8 exponent plane into a self-contained payload."""
        ...

    def decode_into(self, payload: Payload, out: np.ndarray) -> None:
        """Decompress into caller-owned uint8 `out` whose size must equal the encoded length."""
        ...

    def decode_merge_into(self, payload: Payload, sm: np.ndarray, out_u16: np.ndarray) -> None:
        """Decompress and recombine with the SM plane straight into caller-owned BF16 bits."""
        ...


def as_u8(payload: Payload) -> np.ndarray:
    """Zero-copy uint8 view of a bytes-like payload."""
    if isinstance(payload, np.ndarray):
        if payload.dtype != np.uint8 or payload.ndim != 1:
            got = f"{payload.dtype}[{payload.shape}]"
            raise CodecError(f"payload must be a 1-D uint8 array or bytes, got {got}")
        return np.ascontiguousarray(payload)
    try:
        return np.frombuffer(payload, dtype=np.uint8)
    except TypeError as e:
        raise CodecError(f"payload must be bytes-like or a uint8 array, got {type(payload).__name__}") from e


def check_exp(exp: np.ndarray) -> np.ndarray:
    """Validate an exponent plane given to encode()."""
    if isinstance(exp, np.ndarray) and exp.dtype == np.uint8 and exp.ndim == 1:
        return np.ascontiguousarray(exp)
    got = f"{exp.dtype}[{exp.shape}]" if isinstance(exp, np.ndarray) else type(exp).__name__
    raise CodecError(f"exponent plane must be a 1-D uint8 array, got {got}")


def check_merge_args(sm: np.ndarray, out_u16: np.ndarray) -> None:
    """sm and out_u16 must be matching 1-D contiguous uint8 / uint16 buffers."""
    check_vector("sm", sm, np.uint8)
    check_vector("out_u16", out_u16, np.uint16)
    if sm.size != out_u16.size:
        raise CodecError(f"sm has {sm.size} weights but out_u16 has {out_u16.size}")


_scratch = threading.local()


def scratch_u8(n: int) -> np.ndarray:
    """A per-thread reusable uint8 buffer of at least n bytes (decode workers allocate once)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < n:
        buf = np.empty(max(n, 1 << 16), np.uint8)
        _scratch.buf = buf
    return buf[:n]


class DecodeThenMerge:
    """Mixin: decode_merge_into as decode_into a per-thread scratch + merge_into (no fused kernel)."""

    def decode_into(self, payload: Payload, out: np.ndarray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode_merge_into(self, payload: Payload, sm: np.ndarray, out_u16: np.ndarray) -> None:
        """Fallback fusion: the scratch is reused per thread, so nothing is allocated per call."""
        check_merge_args(sm, out_u16)
        exp = scratch_u8(sm.size)
        self.decode_into(payload, exp)
        merge_into(sm, exp, out_u16)


def check_out(out: np.ndarray, n: int, codec_id: str) -> None:
    """decode_into's out must be a uint8 vector of exactly the encoded length."""
    check_vector("out", out, np.uint8)
    if out.size != n:
        raise CodecError(f"{codec_id} payload holds {n} exponents but out has room for {out.size}")
