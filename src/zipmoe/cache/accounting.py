"""Byte accounting: the one memory knob shared by dense weights, staging buffers and the four pools.

Stage: load time (reservations) and the engine thread (reads of used/peak). Nothing here allocates
memory; callers reserve first and allocate after, so the budget is checked before a byte is taken.
Sizes in bytes.
"""

from __future__ import annotations

import threading

from zipmoe.config import format_size, parse_size
from zipmoe.errors import BudgetTooSmallError, ZipMoEError


class MemoryBudget:
    """A total byte budget and named reservations against it; thread-safe.

    Every byte the engine holds (dense weights, pools, staging) is reserved here under a name, so
    `used()` is the engine's footprint and can never exceed `total` (reserve raises instead).
    """

    def __init__(self, total: int | float | str):
        self.total = parse_size(total)
        self._lock = threading.Lock()
        self._items: dict[str, int] = {}
        self._used = 0
        self._peak = 0

    def reserve(self, name: str, nbytes: int) -> None:
        """Account `nbytes` under a new `name`; raise BudgetTooSmallError if the total would be exceeded."""
        if nbytes < 0:
            raise ZipMoEError(f"cannot reserve a negative size ({nbytes}) for {name!r}")
        with self._lock:
            if name in self._items:
                raise ZipMoEError(f"memory reservation {name!r} already exists; release it first")
            self._check_locked(nbytes, name)
            self._items[name] = nbytes
            self._used += nbytes
            self._peak = max(self._peak, self._used)

    def release(self, name: str) -> int:
        """Give back the bytes reserved under `name`; returns them (0 if the name is unknown)."""
        with self._lock:
            nbytes = self._items.pop(name, 0)
            self._used -= nbytes
            return nbytes

    def ensure_fits(self, nbytes: int, what: str) -> None:
        """Raise BudgetTooSmallError unless `nbytes` more would fit; used to check a whole plan at once."""
        with self._lock:
            self._check_locked(nbytes, what)

    def _check_locked(self, nbytes: int, what: str) -> None:
        if self._used + nbytes <= self.total:
            return
        minimum = self._used + nbytes
        held = ", ".join(f"{k} {format_size(v)}" for k, v in self._items.items()) or "nothing"
        raise BudgetTooSmallError(
            f"memory budget {format_size(self.total)} is too small: {what} needs {format_size(nbytes)} "
            f"but only {format_size(self.total - self._used)} is left (already held: {held}). "
            f"The minimum for this configuration is {format_size(minimum)} ({minimum} bytes): raise "
            f"memory_budget to at least that, or ask for smaller pools/fewer staging slots.",
            minimum_bytes=minimum,
        )

    def used(self) -> int:
        """Bytes reserved now."""
        return self._used

    def free(self) -> int:
        """Bytes still available."""
        return self.total - self._used

    def peak(self) -> int:
        """Highest `used()` ever seen; a test checks it never passes `total`."""
        return self._peak

    def breakdown(self) -> dict[str, int]:
        """Reserved bytes per name (a copy), for metrics and error messages."""
        with self._lock:
            return dict(self._items)

    def __repr__(self) -> str:
        return f"MemoryBudget(total={format_size(self.total)}, used={format_size(self._used)})"
