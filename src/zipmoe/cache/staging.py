"""Staging buffers for loads the pools do not keep: read buffers and merge outputs, from the same budget.

Stage: allocated at load time, used by the engine's I/O thread, decode workers and merge. n=slots,
numel=BF16 weights per expert; sizes in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zipmoe.cache.accounting import MemoryBudget
from zipmoe.cache.slabs import DeviceSlab, HostSlab


@dataclass(eq=False)
class Staging:
    """n slots of each buffer kind; slot i of every kind serves one in-flight expert.

    sm.views[i]   host uint8 [sm_stride]: SM plane read from disk (page-aligned, pinned on CUDA)
    e.views[i]    host uint8 [e_stride]: compressed exponent region read from disk
    exp.views[i]  host uint8 [sm_stride]: decoded exponent plane for a late merge (None when loads decode fused)
    full.views[i] device bf16 [numel]: merged expert to compute with; on CPU full.u16[i] is its uint16 view
    """

    name: str  # budget reservation name
    n: int  # slots
    sm: HostSlab
    e: HostSlab
    exp: HostSlab | None
    full: DeviceSlab
    nbytes: int  # bytes reserved in the budget

    def close(self) -> None:
        for slab in (self.sm, self.e, self.exp, self.full):
            if slab is not None:
                slab.close()


def staging_nbytes(n: int, numel: int, sm_stride: int, e_stride: int, exp: bool) -> int:
    """Bytes `n` staging slots take."""
    return n * (sm_stride + e_stride + (sm_stride if exp else 0) + 2 * numel)


def allocate_staging(
    budget: MemoryBudget, name: str, n: int, numel: int, sm_stride: int, e_stride: int,
    device: torch.device, exp: bool, pinned: bool,
) -> Staging:
    """Reserve, then allocate; the reservation is returned if allocation fails."""
    nbytes = staging_nbytes(n, numel, sm_stride, e_stride, exp)
    budget.reserve(name, nbytes)
    try:
        return Staging(
            name=name, n=n,
            sm=HostSlab(n, sm_stride, pinned=pinned),
            e=HostSlab(n, e_stride, pinned=pinned),
            exp=HostSlab(n, sm_stride, pinned=pinned) if exp else None,
            full=DeviceSlab(n, numel, device),
            nbytes=nbytes,
        )
    except BaseException:
        budget.release(name)
        raise
