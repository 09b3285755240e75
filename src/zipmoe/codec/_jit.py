"""The one place where codec kernels are compiled: numba, nogil (decode workers scale with threads),
cached on disk, and compiled lazily at first call (importing zipmoe never compiles anything)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def kernel(fn: F) -> F:
    """`numba.njit(nogil=True, cache=True)`; numba is imported here, only when a codec module loads."""
    import numba

    return numba.njit(nogil=True, cache=True)(fn)  # type: ignore[no-any-return]
