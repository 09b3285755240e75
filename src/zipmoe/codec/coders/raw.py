"""`raw`: the exponent plane stored as is. The baseline every coder must beat, and the escape hatch
for data that does not compress. Payload: the n exponent bytes, nothing else."""

from __future__ import annotations

from typing import Any

import numpy as np

from zipmoe.codec.coders.base import Payload, as_u8, check_exp, check_merge_args, check_out
from zipmoe.codec.merge import merge_into
from zipmoe.errors import CodecError


class RawCoder:
    """Identity coder; decode_merge_into merges straight from the payload (no copy)."""

    codec_id = "raw"

    def params(self) -> dict[str, Any]:
        """No tunables."""
        return {}

    def encode(self, exp: np.ndarray) -> bytes:
        """The bytes themselves."""
        return check_exp(exp).tobytes()

    def decode_into(self, payload: Payload, out: np.ndarray) -> None:
        """Copy; the payload length is the symbol count."""
        buf = as_u8(payload)
        check_out(out, buf.size, self.codec_id)
        out[:] = buf

    def decode_merge_into(self, payload: Payload, sm: np.ndarray, out_u16: np.ndarray) -> None:
        """Merge from the payload buffer directly."""
        buf = as_u8(payload)
        check_merge_args(sm, out_u16)
        if buf.size != sm.size:
            raise CodecError(f"raw payload holds {buf.size} exponents but sm has {sm.size} weights")
        merge_into(sm, buf, out_u16)
