"""Why does the engine read slower than the disk? On the device two 16 MiB O_DIRECT streams read 2.2 GB/s
(scripts/disk_probe.py: one stream as fast as two), yet while the engine's reads were in flight it got
~1.6 GB/s, compressed or not (BENCHMARKS.md, fifth session). This reads the same random experts of a store
the way the engine does, adding one ingredient at a time, and prints GB/s for each:

  bare      read_direct_into a page-aligned buffer (what disk_probe measures, at the store's read sizes)
  verify    + the SM checksum the I/O thread computes (StoreReader.read_sm_into)
  pinned    + into pinned host slots (HostSlab, cudaHostRegister) as on CUDA
  +python   + a thread running Python all the time (the compute thread: generate(), launches), under the
            engine's 0.5 ms GIL switch interval
  +decode   + 8 threads decoding exponents (numba, GIL released), as during a compressed layer

    python scripts/read_path.py runs/zb/store-raw [--experts 64] [--threads 1 2]
"""

import argparse
import threading
import time
from pathlib import Path

import numpy as np
import torch

from zipmoe.cache.slabs import HostSlab
from zipmoe.engine.gil import restore_switch_interval, shorten_switch_interval
from zipmoe.store.aligned import read_direct_into
from zipmoe.store.reader import StoreReader


def timed(reader: StoreReader, entries: list, bufs: list[np.ndarray], threads: int, verify: bool) -> float:
    """GB/s for `threads` threads reading the SM planes of `entries` (thread t takes every t-th one)."""
    start = threading.Barrier(threads + 1)

    def run(t: int) -> None:
        start.wait()
        for e in entries[t::threads]:
            if verify:
                reader.read_sm_into(e, bufs[t])
            else:
                read_direct_into(reader._fd, e.sm.offset, e.sm.length, bufs[t])

    pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    start.wait()
    t0 = time.perf_counter()
    for th in pool:
        th.join()
    return sum(e.sm.length for e in entries) / (time.perf_counter() - t0) / 1e9


class Background:
    """Load next to the reads: a Python busy loop, or numba threads decoding (GIL released)."""

    def __init__(self, kind: str, workers: int = 8):
        self.stop = threading.Event()
        self.threads = []
        if kind == "python":
            self.threads = [threading.Thread(target=self._python)]
        elif kind == "decode":
            from zipmoe.codec.coders.huffman import HuffmanCoder
            from zipmoe.codec.planes import split_bf16

            rng = np.random.default_rng(0)
            w = torch.from_numpy((rng.standard_normal(1 << 21) * 0.02).astype(np.float32)).bfloat16()
            sm, e = split_bf16(w.view(torch.int16).numpy().view(np.uint16))
            coder = HuffmanCoder()
            blob = coder.encode(e)
            self.threads = [threading.Thread(target=self._decode, args=(coder, blob, sm)) for _ in range(workers)]
        for t in self.threads:
            t.start()

    def _python(self) -> None:
        x = 0
        while not self.stop.is_set():
            x = (x + 1) % 1000

    def _decode(self, coder, blob, sm) -> None:
        out = np.empty(sm.size, dtype=np.uint16)
        while not self.stop.is_set():
            coder.decode_merge_into(blob, sm, out)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("store", type=Path)
    p.add_argument("--experts", type=int, default=64, help="experts per measurement (no expert read twice)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    a = p.parse_args()
    shorten_switch_interval()  # as a loaded engine does (0.5 ms)
    reader = StoreReader(a.store)
    entries = list(reader.entries.values())
    order = np.random.default_rng(0).permutation(len(entries))
    stride = reader.max_sm_bytes + 8192
    slab = HostSlab(4, stride, pinned=torch.cuda.is_available())
    plain = [reader.new_sm_buffer() for _ in range(4)]
    mean = np.mean([e.sm.length for e in entries]) / 1e6
    print(f"{a.store}: {len(entries)} experts, SM plane (raw: whole expert) {mean:.1f} MB on average")
    cases = [("bare", plain, False, None), ("verify", plain, True, None), ("pinned", slab.views, True, None),
             ("+python", slab.views, True, "python"), ("+decode", slab.views, True, "decode")]
    at = 0
    for threads in a.threads:
        row = []
        for _name, bufs, verify, bg in cases:
            pick = [entries[int(i)] for i in np.roll(order, -at)[: a.experts]]
            at += a.experts
            load = Background(bg) if bg else None
            try:
                row.append(timed(reader, pick, bufs, threads, verify))
            finally:
                if load:
                    load.close()
        print(f"{threads} thread(s): " + "  ".join(f"{c[0]} {r:.2f}" for c, r in zip(cases, row, strict=True)))
    reader.close()
    slab.close()
    restore_switch_interval()


if __name__ == "__main__":
    main()
