"""Keeping the page cache from holding what a memory budget excludes, for systems that read files
through it (Accelerate's memmaps). Our engine reads with O_DIRECT and needs none of this.

bench stage, in the suite's driver process. Preference order, recorded in every run's JSON:
1. cgroup v2: the system runs in a child process inside a fresh cgroup whose memory.max is the
   budget plus the process's own baseline (`slack`), so its page cache is bounded during the run;
2. drop caches (echo 3 > /proc/sys/vm/drop_caches, root only) before the run: a cold start, but the
   page cache may grow past the budget while it runs;
3. posix_fadvise(DONTNEED) on the model files before the run (any user): the same, per file.
Sizes in bytes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_unavailable(root: Path = CGROUP_ROOT) -> str | None:
    """Why a memory-limited cgroup v2 cannot be made here, or None if it can (probes by making one)."""
    controllers = root / "cgroup.controllers"
    if not controllers.exists():
        return "no cgroup v2 hierarchy at /sys/fs/cgroup"
    if "memory" not in controllers.read_text().split():
        return "cgroup v2 without the memory controller"
    probe = root / f"zipmoe-probe-{os.getpid()}"
    try:
        _enable_memory(root)
        probe.mkdir()
        (probe / "memory.max").write_text("max")
    except OSError as e:
        return f"cgroup v2 not writable ({e.strerror})"
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()
    return None


def _enable_memory(root: Path) -> None:
    control = root / "cgroup.subtree_control"
    if "memory" not in control.read_text().split():
        control.write_text("+memory")


class MemoryCgroup:
    """A child cgroup with memory.max = limit; join() runs in the child between fork and exec."""

    def __init__(self, limit: int, root: Path = CGROUP_ROOT):
        _enable_memory(root)
        self.path = root / f"zipmoe-bench-{os.getpid()}-{id(self):x}"
        self.path.mkdir()
        (self.path / "memory.max").write_text(str(int(limit)))
        with contextlib.suppress(OSError):  # swapping the process out would also dodge the limit
            (self.path / "memory.swap.max").write_text("0")
        self.limit = int(limit)

    def join(self) -> None:
        """preexec_fn: move the calling (child) process into the cgroup."""
        (self.path / "cgroup.procs").write_text("0")

    def peak(self) -> int | None:
        """memory.peak of the cgroup (anon + page cache), where the kernel reports it."""
        try:
            return int((self.path / "memory.peak").read_text())
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()


def drop_caches() -> bool:
    """Flush dirty pages and drop the page cache; False where not permitted."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError:
        return False
    return True


def evict_files(paths: Iterable[str | os.PathLike]) -> int:
    """posix_fadvise(DONTNEED) every regular file under paths; returns the bytes advised."""
    total = 0
    for top in paths:
        top = Path(top)
        files = [top] if top.is_file() else [p for p in top.rglob("*") if p.is_file()] if top.exists() else []
        for f in files:
            with contextlib.suppress(OSError):
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    total += f.stat().st_size
                finally:
                    os.close(fd)
    return total
