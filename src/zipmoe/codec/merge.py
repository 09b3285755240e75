"""Recombination on the CPU: (SM plane, exponent plane) → BF16 bits, into a preallocated buffer.

n=weights. In: sm u8[n], exp u8[n]. Out: u16[n] written in place (the F slot or a staging buffer).
`merge_reference` (planes.py) is the oracle; `merge_into` is the numba kernel (≈ memory speed,
numpy needs 4 temporaries). On CUDA the engine merges here too, into pinned host memory, then copies
BF16 to the GPU: the same 2 bytes/weight cross PCIe as SM + exponent planes would.
"""

from __future__ import annotations

import numpy as np

from zipmoe.codec._jit import kernel
from zipmoe.codec.planes import check_vector
from zipmoe.errors import CodecError


@kernel
def merge_range(sm, exp, out_u16, start, stop):  # pragma: no cover - compiled
    """out[i] = sign | exp << 7 | mantissa for i in [start, stop); callers check bounds."""
    merge_offset(sm[start:stop], exp, start, out_u16[start:stop], stop - start)


@kernel
def merge_offset(sm, exp, exp_off, out_u16, n):  # pragma: no cover - compiled
    """out[i] = merge(sm[i], exp[exp_off + i]) for i < n: merge from a slice of a larger buffer."""
    e = exp[exp_off : exp_off + n]
    for i in range(n):  # 0-based: numba then drops its negative-index wraparound and LLVM vectorizes
        s = np.uint32(sm[i])
        out_u16[i] = np.uint16(((s & np.uint32(0x80)) << np.uint32(8)) | (np.uint32(e[i]) << np.uint32(7))
                               | (s & np.uint32(0x7F)))


def merge_into(sm: np.ndarray, exp: np.ndarray, out_u16: np.ndarray) -> None:
    """Merge two planes into caller-owned BF16 bits; releases the GIL while it runs."""
    check_vector("sm", sm, np.uint8)
    check_vector("exp", exp, np.uint8)
    check_vector("out_u16", out_u16, np.uint16)
    if not (sm.size == exp.size == out_u16.size):
        raise CodecError(f"plane sizes differ: sm {sm.size}, exp {exp.size}, out {out_u16.size}")
    merge_range(sm, exp, out_u16, 0, sm.size)
