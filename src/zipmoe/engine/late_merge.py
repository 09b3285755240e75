"""Late merge (load's default on CUDA; late_merge=True elsewhere): recombine an expert's SM and exponent planes on
the compute device once both are in, so the decode workers write exponents only and an E/MISS expert decodes
while its SM plane is still being read (the fused path's shards must wait for that read: a K-way decode tail
after a layer's last read). The oracle is codec.merge_into; this is the same bit layout as torch byte ops. On a
CPU the merge runs on the compute thread, unpriced by the plan (a dozen byte passes, several times
codec.merge_into's time: BENCHMARKS.md, eighth session): there it is for testing the path a GPU runs. On CUDA
the merge is one Triton kernel (TritonMerge) where Triton is installed: TorchMerge's nine byte ops cost the
compute thread nine launches per expert (~10 µs of Python each, holding the GIL the loader threads need), the
kernel one. merge_class checks the kernel against the codec's oracle on every 16-bit pattern before it is used.
"""

from __future__ import annotations

import logging
import os
import sys

import numpy as np
import torch

from zipmoe.codec.planes import merge_reference, split_bf16
from zipmoe.errors import ZipMoEError

log = logging.getLogger(__name__)

# "auto": TritonMerge on CUDA where Triton imports and the kernel passes its check, else TorchMerge; "torch": always
# TorchMerge (the bench's A/B row). ZIPMOE_MERGE_KERNEL sets it for a process.
MERGE_KERNEL = os.environ.get("ZIPMOE_MERGE_KERNEL", "auto")


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


class TritonMerge:
    """TorchMerge's recombination as one Triton kernel per expert, after the two H2D plane copies. Built only
    through merge_class, which has checked the kernel on this device first."""

    SCRATCH_PLANES = 2  # the device copies of the SM and exponent planes
    BLOCK = 4096

    def __init__(self, numel: int, device: torch.device):
        if sys.byteorder != "little":
            raise ZipMoEError("late_merge writes little-endian BF16; this machine is big-endian: leave it off")
        self._kernel = _triton_kernel()
        self.device, self.numel = device, numel
        self.sm, self.exp = (torch.empty(numel, dtype=torch.uint8, device=device) for _ in range(2))
        self._grid = (-(-numel // self.BLOCK),)

    def __call__(self, sm: torch.Tensor, exp: torch.Tensor, out: torch.Tensor) -> None:
        """out (any 2-byte dtype, [numel] contiguous) = merge(sm, exp); sm and exp uint8 [numel], host or device."""
        n = out.numel()
        d_sm, d_exp, grid = self.sm, self.exp, self._grid
        if n != self.numel:  # shorter than the scratch (the check below); an engine's experts all fill it
            d_sm, d_exp, grid = d_sm[:n], d_exp[:n], (-(-n // self.BLOCK),)
        d_sm.copy_(sm, non_blocking=True)
        d_exp.copy_(exp, non_blocking=True)
        with torch.cuda.device(self.device):  # Triton launches on the current device's current stream
            self._kernel[grid](d_sm, d_exp, out.view(torch.int16), n, BLOCK=self.BLOCK)


def merge_class(device: torch.device) -> type[TorchMerge] | type[TritonMerge]:
    """Which merge a late-merging engine on `device` uses (MERGE_KERNEL): TritonMerge on CUDA when Triton
    imports and the kernel passes its check there (once per device and process), else TorchMerge. A failed
    check is logged as a warning and never used: the torch byte ops are slower, not wrong."""
    if MERGE_KERNEL not in ("auto", "torch"):
        raise ZipMoEError(f"ZIPMOE_MERGE_KERNEL={MERGE_KERNEL!r}: use 'auto' or 'torch'")
    if device.type != "cuda" or MERGE_KERNEL == "torch":
        return TorchMerge
    key = str(device)
    if key not in _VERDICTS:
        _VERDICTS[key] = _triton_works(device)
    return TritonMerge if _VERDICTS[key] else TorchMerge


_VERDICTS: dict[str, bool] = {}  # device -> whether the Triton kernel passed its check there
_KERNEL = None


def _triton_works(device: torch.device) -> bool:
    try:
        check_triton_merge(device)
    except ImportError as exc:
        log.info("zipmoe: no Triton (%s); late merge uses torch byte ops", exc)
        return False
    except Exception as exc:  # a compile failure (no ptxas, driver) or wrong bits: neither may serve experts
        log.warning("zipmoe: the Triton merge kernel failed its check on %s, so late merge uses torch byte ops "
                    "(slower, same bits); please report this: %s", device, exc)
        return False
    return True


def check_triton_merge(device: torch.device) -> None:
    """Every 16-bit pattern, plus a ragged last block, through the kernel against the codec's oracle (it
    compiles the kernel, too); raises ZipMoEError naming the first wrong pattern."""
    bits = (np.arange((1 << 16) + 17) & 0xFFFF).astype(np.uint16)
    sm, exp = split_bf16(bits)
    want = merge_reference(sm, exp)
    out = torch.full((bits.size,), -1, dtype=torch.int16, device=device)  # poisoned: an unwritten element fails
    TritonMerge(bits.size, device)(torch.from_numpy(sm), torch.from_numpy(exp), out)
    got = out.cpu().numpy().view(np.uint16)
    if not np.array_equal(got, want):
        bad = int(np.flatnonzero(got != want)[0])
        raise ZipMoEError(f"the Triton merge kernel wrote {got[bad]:#06x} for BF16 pattern {bits[bad]:#06x} "
                          f"(want {want[bad]:#06x})")


def _triton_kernel():
    """The jitted kernel, defined on first use so that importing zipmoe never needs Triton."""
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def merge_kernel(sm_ptr, exp_ptr, out_ptr, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: no wrap past 2**31
            mask = offs < n
            sm = tl.load(sm_ptr + offs, mask=mask).to(tl.int32)  # uint8 -> int32 zero-extends
            e = tl.load(exp_ptr + offs, mask=mask).to(tl.int32)
            bits = ((sm & 0x80) << 8) | (e << 7) | (sm & 0x7F)  # sign | exponent | mantissa, as in merge_into
            tl.store(out_ptr + offs, bits.to(tl.int16), mask=mask)  # int32 -> int16 truncates: the low 16 bits

        _KERNEL = merge_kernel  # two threads racing here build two equal kernels; harmless
    return _KERNEL
