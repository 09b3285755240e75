"""Preallocated slabs: one allocation per pool plane, carved into fixed slots at load time.

Stage: load time only. The hot path never allocates; it hands out the prebuilt per-slot views kept
here. n=slots, numel=BF16 weights per expert; sizes in bytes.

Host slabs come from an anonymous mmap: page-aligned (O_DIRECT reads land straight in a slot) and
exactly the bytes asked for. When the compute device is CUDA they are pinned in place with
cudaHostRegister, because torch's pinned allocator (pin_memory=True) rounds each block up to a power
of two: measured on the H200 machine (torch 2.11), asking for 1.61 GB pinned took 2 GiB.
"""

from __future__ import annotations

import mmap

import numpy as np
import torch

from zipmoe.errors import ZipMoEError
from zipmoe.types import ExpertKey

PAGE = 4096  # host slot alignment for O_DIRECT; the store aligns chunks to the same size


def align_up(n: int, align: int) -> int:
    """Smallest multiple of `align` that is >= n."""
    return -(-n // align) * align


class HostSlab:
    """`n` host slots of `stride` bytes in one page-aligned mapping; pinned for CUDA.

    `views[i]` (numpy uint8) and `tensors[i]` (torch uint8, same memory) are built once here.
    """

    def __init__(self, n: int, stride: int, *, pinned: bool = False, populate: bool = False):
        if n < 0 or stride <= 0:
            raise ZipMoEError(f"host slab needs n >= 0 slots of a positive size, got n={n}, stride={stride}")
        self.n, self.stride, self.nbytes = n, stride, n * stride
        self._pinned_ptr = 0
        if self.nbytes == 0:
            self._map = None
            self.array = np.empty((0, stride), dtype=np.uint8)
        else:
            self._map = mmap.mmap(-1, self.nbytes)
            self.array = np.frombuffer(self._map, dtype=np.uint8).reshape(n, stride)
            if populate:
                self.array.fill(0)  # touch every page now, not on the first read into a slot
        self.tensor = torch.from_numpy(self.array)
        if pinned and self.nbytes:
            self._pin()
        self.views: list[np.ndarray] = list(self.array)
        self.tensors: list[torch.Tensor] = list(self.tensor.unbind(0))

    def _pin(self) -> None:
        ptr = self.tensor.data_ptr()
        err = torch.cuda.cudart().cudaHostRegister(ptr, self.nbytes, 0)
        if int(err) != 0:
            raise ZipMoEError(
                f"could not pin {self.nbytes} bytes of host memory for the expert pools (CUDA error {err}); "
                "lower memory_budget or check the locked-memory limit (ulimit -l)"
            )
        self._pinned_ptr = ptr

    @property
    def pinned(self) -> bool:
        return self._pinned_ptr != 0

    def close(self) -> None:
        """Unpin; the mapping itself is freed when the last view of it is gone."""
        if self._pinned_ptr:
            torch.cuda.cudart().cudaHostUnregister(self._pinned_ptr)
            self._pinned_ptr = 0
        self.views, self.tensors = [], []
        self.array = np.empty((0, self.stride), dtype=np.uint8)
        self.tensor = torch.from_numpy(self.array)


class DeviceSlab:
    """`n` full BF16 experts on the compute device: a torch tensor [n, numel] bfloat16.

    `views[i]` is the 1-D bf16 tensor of slot i; on CPU `u16[i]` is the same memory as numpy uint16,
    the output type of the CPU merge kernels.
    """

    def __init__(self, n: int, numel: int, device: torch.device):
        if n < 0 or numel <= 0:
            raise ZipMoEError(f"device slab needs n >= 0 slots of numel > 0, got n={n}, numel={numel}")
        self.n, self.numel, self.nbytes = n, numel, n * numel * 2
        self.tensor = torch.empty((n, numel), dtype=torch.bfloat16, device=device)
        self.views: list[torch.Tensor] = list(self.tensor.unbind(0))
        self.u16: list[np.ndarray] | None = None
        if device.type == "cpu":
            self.u16 = list(self.tensor.view(torch.int16).numpy().view(np.uint16))

    def close(self) -> None:
        """Drop the slab (device memory returns to torch's allocator once no view is alive)."""
        self.views, self.u16 = [], None
        self.tensor = self.tensor.new_empty((0, self.numel))


def copy_plane(
    dst: np.ndarray, src: np.ndarray | None, exact: int | None, what: str, key: ExpertKey
) -> None:
    """Copy a host plane into its slot unless it is already there (loaded in place)."""
    if src is None:
        raise ZipMoEError(f"{key}: the cache keeps this expert's {what}, so admit_copy() needs it")
    src = np.asarray(src).reshape(-1).view(np.uint8)
    if (exact is not None and src.nbytes != exact) or src.nbytes > dst.nbytes or src.nbytes == 0:
        raise ZipMoEError(f"{key}: {what} of {src.nbytes} bytes does not match its {dst.nbytes}-byte slot")
    if not np.shares_memory(dst, src):
        dst[: src.nbytes] = src


def copy_full(dst: torch.Tensor, src: torch.Tensor | np.ndarray | None, numel: int, key: ExpertKey) -> None:
    """Copy a merged BF16 expert into its F slot unless it was merged in place."""
    if src is None:
        raise ZipMoEError(f"{key}: the cache keeps this expert in F, so admit_copy() needs the full tensor")
    if isinstance(src, np.ndarray):
        src = torch.from_numpy(np.ascontiguousarray(src).reshape(-1).view(np.int16)).view(torch.bfloat16)
    if src.numel() != numel or src.element_size() != 2:
        got = f"{tuple(src.shape)} {src.dtype}"
        raise ZipMoEError(f"{key}: the full expert must be {numel} 16-bit values, got {got}")
    if src.data_ptr() != dst.data_ptr():
        dst.copy_(src.reshape(-1).view(torch.bfloat16))
