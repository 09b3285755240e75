"""O_DIRECT read rate in 4 MiB parts (the prefetcher's READ_PART) with one or two reading threads, alone or
beside a thread that runs Python without pause (the compute thread launching the model's kernels). Why the
prefetcher reads with two threads: a thread whose read returns while another runs Python waits for the GIL
(up to sys.getswitchinterval, the engine's 0.5 ms) before it can issue the next part, and the disk idles.

    python scripts/gil_reads.py [--file /path/on/the/disk --size-mib 768 --repeats 2]

Writes the file once (random bytes) if it is missing or of another size.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

from zipmoe.engine.gil import ENGINE_SWITCH_INTERVAL_S
from zipmoe.engine.prefetch import READ_PART
from zipmoe.store.aligned import aligned_buffer, read_direct_into

EXPERT = 12 << 20  # about one Qwen1.5-MoE expert's SM plane + compressed E region


def spin(stop: threading.Event) -> None:
    """Run Python without pause until stop is set (the compute thread launching the model's kernels)."""
    x = 0
    while not stop.is_set():
        for i in range(200):
            x += i


def random_file(path: str, size: int) -> None:
    """Write `size` random bytes to path (a multiple of 16 MiB), unless a file of that size is there; synced."""
    if not os.path.exists(path) or os.path.getsize(path) != size:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "wb") as f:
            for _ in range(size >> 24):
                f.write(os.urandom(1 << 24))
        os.sync()


def rate(fd: int, size: int, threads: int, busy_main: bool) -> float:
    """GB/s reading the whole file, one expert-sized span after another, split over `threads` threads."""
    offsets = list(range(0, size - EXPERT + 1, EXPERT))
    stop = threading.Event()

    def read(mine: list[int]) -> None:
        buf = aligned_buffer(EXPERT)
        for off in mine:
            read_direct_into(fd, off, EXPERT, buf, part=READ_PART, stop=lambda: False)

    busy = threading.Thread(target=spin, args=(stop,)) if busy_main else None
    if busy:
        busy.start()
    readers = [threading.Thread(target=read, args=(offsets[k::threads],)) for k in range(threads)]
    t0 = time.perf_counter()
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    seconds = time.perf_counter() - t0
    stop.set()
    if busy:
        busy.join()
    return len(offsets) * EXPERT / seconds / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", default="gil_reads.bin")
    p.add_argument("--size-mib", type=int, default=768)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    size = a.size_mib << 20
    random_file(a.file, size)
    sys.setswitchinterval(ENGINE_SWITCH_INTERVAL_S)
    fd = os.open(a.file, os.O_RDONLY | os.O_DIRECT)
    try:
        rate(fd, size, 1, False)  # warm-up, not reported
        for _ in range(a.repeats):
            for threads, busy in ((1, False), (1, True), (2, True), (2, False)):
                print(f"threads={threads} busy_python_thread={busy}: {rate(fd, size, threads, busy):.2f} GB/s",
                      flush=True)
    finally:
        os.close(fd)


if __name__ == "__main__":
    main()
