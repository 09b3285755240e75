"""Keep Python's cyclic garbage collector off the objects that exist before a model is loaded.

Why: a loaded model lives in a heap of ~440,000 tracked objects, ~350,000 of them torch's and
transformers' own. load()'s allocations leave a full (generation-2) collection pending, and the
engine's per-layer bookkeeping sets it off during the first requests: one 258 ms pause on the dev
machine in a 40-token generation with a DeepSeek-V2-shaped model (scripts/gc_pauses.py). load()
collects once and gc.freeze()s the objects alive before it: the pending pass happens at load, and
later full passes skip the libraries (the permanent generation is never walked).
Not the model itself: a frozen reference cycle is never collected, so a model dropped without unload()
would keep its engine's threads forever. An older model still referenced during a later load() is
frozen with everything else; it is freed by reference counting once dropped, which is why zipmoe's
own objects keep no cycle through the model (models/compute.py holds it weakly). Process-wide, hence
the reference count: the last engine to close unfreezes.
"""

from __future__ import annotations

import gc
import threading

_lock = threading.Lock()
_users = 0
_ours = False  # we froze (an application that froze its heap itself keeps managing it)


def freeze_loaded_objects() -> None:
    """Collect once, then freeze every object alive now (call before building a model). Only the first of
    overlapping calls freezes: a later one would freeze the models loaded in between. Pair with
    release_frozen()."""
    global _users, _ours
    with _lock:
        _users += 1
        first = _users == 1 and gc.get_freeze_count() == 0
    if first:  # outside the lock: the collection may run finalizers that close (and release) engines
        gc.collect()
        gc.freeze()
        with _lock:
            _ours = True


def release_frozen() -> None:
    """Undo one freeze_loaded_objects(); the last caller unfreezes (frozen objects rejoin collection)."""
    global _users, _ours
    with _lock:
        if _users == 0:
            return
        _users -= 1
        if _users == 0 and _ours:
            gc.unfreeze()
            _ours = False
