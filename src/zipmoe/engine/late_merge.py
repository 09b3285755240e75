"""Late merge (load's default on CUDA; late_merge=True elsewhere): recombine an expert's SM and exponent planes on
the compute device once both are in, so the decode workers write exponents only and an E/MISS expert decodes
while its SM plane is still being read (the fused path's shards must wait for that read: a K-way decode tail
after a layer's last read). The oracle is codec.merge_into; this is the same bit layout as torch byte ops. On a
CPU the merge runs on the compute thread, unpriced by the plan (a dozen byte passes, several times
codec.merge_into's time: BENCHMARKS.md, eighth session): there it is for testing the path a GPU runs; a GPU's
merge is a few elementwise kernels.
"""

from __future__ import annotations

import sys

import torch

from zipmoe.errors import ZipMoEError


class TorchMerge:
    """The same recombination as torch ops on the compute device, for merging after the planes arrive
    (engine late_merge): the SM and exponent planes are copied in (on CUDA: H2D, the same 2 bytes/weight
    a merged BF16 copy would be), then written as the output's two bytes per weight, low byte
    (exp & 1) << 7 | mantissa, high byte sign | exp >> 1 (little-endian BF16). Byte ops only, so nothing
    depends on signed shifts. Three planes of scratch, made once; in-place ops, no allocation per call.
    Calls on one device are ordered by its stream, so one scratch set serves every expert."""

    SCRATCH_PLANES = 3  # bytes of scratch per weight

    def __init__(self, numel: int, device: torch.device):
        if sys.byteorder != "little":  # the byte positions below are little-endian BF16
            raise ZipMoEError("late_merge writes little-endian BF16; this machine is big-endian: leave it off")
        self.sm, self.exp, self.tmp = (torch.empty(numel, dtype=torch.uint8, device=device) for _ in range(3))

    def __call__(self, sm: torch.Tensor, exp: torch.Tensor, out: torch.Tensor) -> None:
        """out (any 2-byte dtype, [numel] contiguous) = merge(sm, exp); sm and exp uint8 [numel], any device."""
        d_sm, d_exp, tmp = self.sm, self.exp, self.tmp
        d_sm.copy_(sm, non_blocking=True)
        d_exp.copy_(exp, non_blocking=True)
        pair = out.view(torch.uint8).view(-1, 2)
        torch.bitwise_right_shift(d_exp, 1, out=tmp)  # exponent bits 7..1
        hi = pair[:, 1]
        hi.copy_(d_sm)
        hi.bitwise_and_(0x80).bitwise_or_(tmp)
        d_exp.bitwise_and_(1).bitwise_left_shift_(7)  # exponent bit 0, in bit 7
        lo = pair[:, 0]
        lo.copy_(d_sm)
        lo.bitwise_and_(0x7F).bitwise_or_(d_exp)
