"""`lz4`: LZ4 block on the exponent plane (fast, but only ~1.2x: exponents have little repetition).

Payload: u64 n (little-endian) + one LZ4 block (python-lz4 releases the GIL).
"""

from __future__ import annotations

import struct
from typing import Any

import lz4.block
import numpy as np

from zipmoe.codec.coders.base import DecodeThenMerge, Payload, as_u8, check_exp, check_out
from zipmoe.errors import CodecError

_N = struct.Struct("<Q")


class Lz4Coder(DecodeThenMerge):
    """LZ4 block with our own size header (so a corrupt size is checked before any allocation)."""

    codec_id = "lz4"

    def __init__(self, acceleration: int = 1):
        if not isinstance(acceleration, int) or acceleration < 1:
            raise CodecError(f"lz4 acceleration must be an int >= 1, got {acceleration!r}")
        self.acceleration = acceleration

    def params(self) -> dict[str, Any]:
        """Acceleration (1 = best ratio of the fast mode)."""
        return {"acceleration": self.acceleration}

    def encode(self, exp: np.ndarray) -> bytes:
        """Size header + block."""
        exp = check_exp(exp)
        body = lz4.block.compress(exp, store_size=False, acceleration=self.acceleration) if exp.size else b""
        return _N.pack(exp.size) + body

    def decode_into(self, payload: Payload, out: np.ndarray) -> None:
        """Check the recorded size against out, then decompress."""
        buf = as_u8(payload)
        if buf.size < _N.size:
            raise CodecError(f"lz4 payload truncated: {buf.size} bytes, the header alone needs {_N.size}")
        (n,) = _N.unpack_from(buf, 0)
        check_out(out, n, self.codec_id)
        if n == 0:
            if buf.size != _N.size:
                raise CodecError("lz4 payload for 0 exponents has trailing bytes: corrupt chunk")
            return
        try:
            data = lz4.block.decompress(buf[_N.size :], uncompressed_size=n)
        except lz4.block.LZ4BlockError as e:
            raise CodecError(f"lz4 payload is corrupt: {e}") from e
        if len(data) != n:
            raise CodecError(f"lz4 payload decoded to {len(data)} bytes, its header said {n}")
        out[:] = np.frombuffer(data, np.uint8)
