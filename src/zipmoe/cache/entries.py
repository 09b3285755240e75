"""Per-expert slot ownership, the Targets a loader fills, and the Lease that pins a layer's experts.

Stage: engine thread, inside ExpertCache. Slot indices are into the cache's slabs (-1 = none).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from zipmoe.types import ExpertKey, State

if TYPE_CHECKING:
    from zipmoe.cache.cache import ExpertCache

PEND_F, PEND_SM, PEND_E = 1, 2, 4  # pending bits: slot claimed by targets(), not yet filled and committed


@dataclass(slots=True)
class SlotEntry:
    """Slots one expert owns (-1 = none) and which of them are still pending."""

    f: int = -1
    sm: int = -1
    e: int = -1
    e_nbytes: int = 0  # bytes of the compressed exponent region in the E slot
    pending: int = 0
    handed: int = 0  # pending bits the last targets() handed to a loader; only these can be committed

    def host(self) -> State | None:
        """Host pool it is a member of, pending slots included."""
        if self.sm >= 0:
            return State.C if self.e >= 0 else State.S
        return State.E if self.e >= 0 else None

    def state(self) -> State:
        """State as seen by a lookup: committed slots only."""
        if self.f >= 0 and not self.pending & PEND_F:
            return State.F
        sm, e = self.sm >= 0 and not self.pending & PEND_SM, self.e >= 0 and not self.pending & PEND_E
        if sm:
            return State.C if e else State.S
        return State.E if e else State.MISS


@dataclass(frozen=True, slots=True)
class Targets:
    """Where a loader writes what it loads for `key`; None = not kept, use a staging buffer."""

    key: ExpertKey
    full: torch.Tensor | None  # F slot, bf16 [numel] on the device: merge output
    full_u16: np.ndarray | None  # same memory as uint16 (CPU device only)
    sm: np.ndarray | None  # SM slot, uint8 [sm_stride]: read the SM plane (numel bytes) here
    sm_t: torch.Tensor | None  # same memory as a torch uint8 tensor
    e: np.ndarray | None  # E slot, uint8 [e_stride]: read the compressed exponent region here
    e_t: torch.Tensor | None


class Lease:
    """Pins a layer's experts (never evicted while leased) and records their states at lookup."""

    def __init__(self, cache: ExpertCache, keys: Iterable[ExpertKey]):
        self._cache, self.keys = cache, tuple(keys)
        self.states: list[State] = [cache._acquire_one(k) for k in self.keys]
        self._open = True

    def release(self) -> None:
        """Unpin every key; claims never committed are aborted. Safe to call twice."""
        if self._open:
            self._open = False
            for key in self.keys:
                self._cache.unpin(key)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
