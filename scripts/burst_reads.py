"""Does the disk read a layer's burst of plane reads as fast as a stream? At batch 1 a layer reads ~2
missing experts (each an E region of ~2.9 MB, then an SM plane of ~8.6 MB) on two I/O threads, and then the
disk idles while the layer decodes, merges, computes and the next layer's attention runs (~3 ms). While its
reads are in flight the engine gets ~1.4 GB/s where the probe's back-to-back stream gets ~1.8 (BENCHMARKS.md,
thirteenth session). If a burst that starts on an idle disk is slower than the same reads back to back (a
per-request latency, or a disk that ramps up), the I/O lower bound (bytes ÷ the stream's rate) is out of
reach for bursty reads, and only keeping the disk busy between layers (prefetch) closes the gap.

Measures, with no other thread running Python, in GB/s (median of --bursts bursts each):
  stream      one thread reading 16 MiB chunks back to back (what the bound's rate means)
  burst gap=G two threads taking a layer's four plane reads in order (E, SM, E, SM), then G ms of idle disk
  native      the gap=3 bursts through store/native_reads (alone, and +python)
  +python    the gap=3 bursts beside a thread running Python without pause (the compute thread)
  lat gap=G   one 4 KiB read at a random offset after G ms idle (ms, median)

    python scripts/burst_reads.py [--file runs/burst.bin --size-mib 1536 --bursts 60]

Writes the file once (random bytes) if it is missing or of another size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import numpy as np
from gil_reads import random_file, spin  # scripts/ is on sys.path when a script runs

from zipmoe.engine.gil import ENGINE_SWITCH_INTERVAL_S
from zipmoe.store.aligned import ALIGN, align_up, aligned_buffer, read_direct_into
from zipmoe.store.native_reads import NativeReadChannel, ReadBatch

E_BYTES, SM_BYTES = 2_900_000, 8_650_752  # one Qwen1.5-MoE expert: compressed E region, SM plane
LAYER = (E_BYTES, SM_BYTES, E_BYTES, SM_BYTES)  # a batch-1 layer with two misses, in io_queue order


def offsets(rng: np.random.Generator, size: int, n: int, span: int) -> list[int]:
    return [int(o) * ALIGN for o in rng.integers(0, (size - span) // ALIGN, n)]


def stream(fd: int, size: int, rng: np.random.Generator, total: int = 768 << 20) -> float:
    chunk = 16 << 20
    buf = aligned_buffer(chunk)
    offs = offsets(rng, size, total // chunk, chunk)
    t0 = time.perf_counter()
    for o in offs:
        read_direct_into(fd, o, chunk, buf)
    return len(offs) * chunk / (time.perf_counter() - t0) / 1e9


def bursts(fd: int, size: int, rng: np.random.Generator, n: int, gap_s: float, busy: bool = False,
           native: bool = False) -> float:
    """Median GB/s of n layer bursts on two threads, gap_s of idle disk between bursts; busy: beside a thread
    running Python without pause (the compute thread), under the engine's GIL switch interval; native: the
    reads go through store/native_reads (two native streams), timed until the last completion is handed on."""
    stop = threading.Event()
    spinner = threading.Thread(target=spin, args=(stop,)) if busy else None
    if spinner:
        sys.setswitchinterval(ENGINE_SWITCH_INTERVAL_S)
        spinner.start()
    try:
        return (_native_bursts if native else _bursts)(fd, size, rng, n, gap_s)
    finally:
        stop.set()
        if spinner:
            spinner.join()


def _bursts(fd: int, size: int, rng: np.random.Generator, n: int, gap_s: float) -> float:
    bufs = [aligned_buffer(SM_BYTES + 2 * ALIGN) for _ in range(2)]
    rates = []
    for _ in range(n):
        todo = list(zip(LAYER, offsets(rng, size, len(LAYER), SM_BYTES + ALIGN), strict=True))
        lock = threading.Lock()

        def reader(buf: np.ndarray, todo: list[tuple[int, int]] = todo, lock: threading.Lock = lock) -> None:
            while True:
                with lock:
                    if not todo:
                        return
                    length, off = todo.pop(0)
                read_direct_into(fd, off, length, buf)

        threads = [threading.Thread(target=reader, args=(b,)) for b in bufs]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rates.append(sum(LAYER) / (time.perf_counter() - t0) / 1e9)
        time.sleep(gap_s)
    return statistics.median(rates)


def _native_bursts(fd: int, size: int, rng: np.random.Generator, n: int, gap_s: float) -> float:
    bufs = [aligned_buffer(SM_BYTES + 2 * ALIGN) for _ in LAYER]
    addrs = np.array([b.ctypes.data for b in bufs], dtype=np.int64)
    spans = np.array([align_up(length) for length in LAYER], dtype=np.int64)
    channel = NativeReadChannel(2)
    rates = []
    try:
        for _ in range(n):
            left = [len(LAYER)]
            done = threading.Event()

            def on_done(i: int, got: int, t0: float, t1: float, left: list[int] = left,
                        done: threading.Event = done) -> None:
                left[0] -= 1
                if not left[0]:
                    done.set()

            starts = np.array(offsets(rng, size, len(LAYER), SM_BYTES + ALIGN), dtype=np.int64)
            t0 = time.perf_counter()
            channel.submit(ReadBatch(fd, starts, spans, addrs, on_done))
            done.wait()
            rates.append(sum(LAYER) / (time.perf_counter() - t0) / 1e9)
            time.sleep(gap_s)
    finally:
        channel.close()
    return statistics.median(rates)


def latency_ms(fd: int, size: int, rng: np.random.Generator, n: int, gap_s: float) -> float:
    buf = aligned_buffer(ALIGN)
    times = []
    for o in offsets(rng, size, n, ALIGN):
        time.sleep(gap_s)
        t0 = time.perf_counter()
        read_direct_into(fd, o, ALIGN, buf)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", default="runs/burst.bin")
    p.add_argument("--size-mib", type=int, default=1536)
    p.add_argument("--bursts", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    size = a.size_mib << 20
    random_file(a.file, size)
    rng = np.random.default_rng(0)
    fd = os.open(a.file, os.O_RDONLY | os.O_DIRECT)
    try:
        stream(fd, size, rng, 256 << 20)  # warm-up, not reported
        for r in range(a.repeats):
            row = [f"stream {stream(fd, size, rng):.2f}"]
            row += [f"burst gap={g}ms {bursts(fd, size, rng, a.bursts, g / 1e3):.2f}" for g in (0, 3, 15)]
            row.append(f"burst gap=3ms +python {bursts(fd, size, rng, a.bursts, 3e-3, busy=True):.2f}")
            row.append(f"native gap=3ms {bursts(fd, size, rng, a.bursts, 3e-3, native=True):.2f}")
            row.append(f"native gap=3ms +python {bursts(fd, size, rng, a.bursts, 3e-3, busy=True, native=True):.2f}")
            row += [f"lat gap={g}ms {latency_ms(fd, size, rng, a.bursts, g / 1e3):.3f}" for g in (0, 3, 15)]
            print(f"repeat {r + 1}:", " | ".join(row), flush=True)
    finally:
        os.close(fd)


if __name__ == "__main__":
    main()
