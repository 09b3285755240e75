"""A shorter GIL switch interval while any engine is loaded (restored when the last one closes).

Why: the engine's I/O threads and decode workers spend their time in syscalls and numba kernels that
release the GIL, and each must take it back to hand its result on. Python makes such a thread wait
for the switch interval (5 ms by default) whenever another thread is running Python — the compute
thread launching kernels, say. Measured on the dev machine: an 8 MiB pread took 1.0 ms alone, 6.3 ms
next to a busy Python thread, 1.7 ms with a 0.5 ms interval. Process-wide, hence the reference count.
"""

from __future__ import annotations

import sys
import threading

ENGINE_SWITCH_INTERVAL_S = 0.0005

_lock = threading.Lock()
_users = 0
_saved: float | None = None


def shorten_switch_interval(interval_s: float | None = None) -> None:
    """Lower sys.setswitchinterval to interval_s (default ENGINE_SWITCH_INTERVAL_S, read at call time so a
    benchmark can A/B it); never raises it. Pair with restore_switch_interval()."""
    global _users, _saved
    interval_s = ENGINE_SWITCH_INTERVAL_S if interval_s is None else interval_s
    with _lock:
        if _users == 0:
            _saved = sys.getswitchinterval()
        _users += 1
        if interval_s < sys.getswitchinterval():
            sys.setswitchinterval(interval_s)


def restore_switch_interval() -> None:
    """Undo one shorten_switch_interval(); the last caller puts back the interval found by the first."""
    global _users, _saved
    with _lock:
        if _users == 0:
            return
        _users -= 1
        if _users == 0 and _saved is not None:
            sys.setswitchinterval(_saved)
            _saved = None
