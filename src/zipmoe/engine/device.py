"""Compute-device specifics: where merged BF16 experts live and how planes become BF16 there.

CPU: decode workers write merged BF16 straight into the F slot (codec's fused numba kernel), so
nothing is left to do here. CUDA: workers decode exponent planes into pinned host buffers; the
compute thread copies SM + exponent planes to the GPU (non-blocking, pinned) and merges with torch
ops on the current stream, which orders the merge before the expert's compute for free.
N=elements of one expert; planes are uint8 [N]; merged output is bfloat16 [N].
"""

from __future__ import annotations

import torch


def is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def merge_planes_torch(sm: torch.Tensor, exp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """BF16 bits = (sign << 15) | (exp << 7) | mantissa, computed in int32 so no shift overflows.

    The reference for the CUDA path; `out` is an int16/bfloat16 [N] tensor on the same device.
    Kept in torch (not a custom kernel) because on the GPU it is bandwidth-bound and three fused
    elementwise kernels already run at a fraction of the PCIe copy time.
    """
    sm32 = sm.to(torch.int32)
    bits = ((sm32 & 0x80) << 8) | (exp.to(torch.int32) << 7) | (sm32 & 0x7F)
    out.view(torch.int16).copy_(bits.to(torch.int16))
    return out


def pinned_empty(nbytes: int, device: torch.device) -> torch.Tensor:
    """Host staging buffer: pinned when the compute device is CUDA (async H2D), plain otherwise."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=is_cuda(device))
