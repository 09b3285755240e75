"""BF16 bits ⇄ (SM plane, exponent plane): the bit-field split of DESIGN.md §1.

n=weights. In: u16[n] (BF16 bit patterns). Out: sm u8[n] = sign<<7 | mantissa (stored raw),
exp u8[n] = the 8 exponent bits (entropy-coded). Runs on whichever thread calls it (nogil).
"""

from __future__ import annotations

import numpy as np

from zipmoe.codec._jit import kernel
from zipmoe.errors import CodecError


@kernel
def _split_kernel(u16, sm_out, exp_out):  # pragma: no cover - compiled
    for i in range(u16.size):
        v = u16[i]
        sm_out[i] = ((v >> 8) & 0x80) | (v & 0x7F)
        exp_out[i] = (v >> 7) & 0xFF


def check_vector(name: str, a: np.ndarray, dtype: type) -> None:
    """Kernels have no bounds checks: every array they touch must be 1-D, contiguous and typed."""
    if not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != 1 or not a.flags.c_contiguous:
        got = f"{a.dtype}[{a.shape}]" if isinstance(a, np.ndarray) else type(a).__name__
        raise CodecError(f"{name} must be a 1-D contiguous {np.dtype(dtype).name} array, got {got}")


def split_into(u16: np.ndarray, sm_out: np.ndarray, exp_out: np.ndarray) -> None:
    """Split BF16 bits into caller-owned SM and exponent planes (no allocation on the hot path)."""
    check_vector("u16", u16, np.uint16)
    check_vector("sm_out", sm_out, np.uint8)
    check_vector("exp_out", exp_out, np.uint8)
    if not (u16.size == sm_out.size == exp_out.size):
        raise CodecError(f"plane sizes differ: u16 {u16.size}, sm {sm_out.size}, exp {exp_out.size}")
    _split_kernel(u16, sm_out, exp_out)


def split_bf16(u16: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sm, exp) planes of a flat BF16 bit vector; accepts any contiguous uint16 view."""
    flat = np.ascontiguousarray(u16).reshape(-1) if isinstance(u16, np.ndarray) else u16
    sm = np.empty(flat.size, np.uint8)
    exp = np.empty(flat.size, np.uint8)
    split_into(flat, sm, exp)
    return sm, exp


def merge_reference(sm: np.ndarray, exp: np.ndarray) -> np.ndarray:
    """Plainly correct numpy merge, the oracle for every fast path: u16 = sign | exp << 7 | mantissa."""
    sm16 = np.asarray(sm, dtype=np.uint8).astype(np.uint16)
    exp16 = np.asarray(exp, dtype=np.uint8).astype(np.uint16)
    if sm16.shape != exp16.shape:
        raise CodecError(f"plane shapes differ: sm {sm16.shape}, exp {exp16.shape}")
    return ((sm16 & 0x80) << 8) | (exp16 << 7) | (sm16 & 0x7F)
