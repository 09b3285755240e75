"""Why does the engine read slower than the disk? On the device one or two 16 MiB O_DIRECT streams read
2.1–2.4 GB/s (scripts/disk_probe.py), yet while the engine's reads were in flight it got ~1.6 GB/s,
compressed or not (BENCHMARKS.md, fifth session). This reads random experts of a store plane by plane, as
the engine's I/O threads do (the SM plane, then the E region), adding one ingredient at a time, and
prints GB/s for each:

  bare      read_direct_into a page-aligned buffer (what disk_probe measures, at the store's read sizes)
  verify    + the checksums (StoreReader.read_sm_into / read_e_into)
  pinned    + into pinned host slots (HostSlab, cudaHostRegister) as on CUDA
  +python   + a thread running Python all the time (the compute thread: generate(), launches), under the
            engine's 0.5 ms GIL switch interval
  +decode   + 8 threads decoding exponents (numba, GIL released), as during a compressed layer

    python scripts/read_path.py runs/zb/store-raw [--experts 64] [--threads 1 2]

Experts are drawn in one random order and each measurement takes the next --experts of it, wrapping
around on stores with fewer than 10 × --experts experts.
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


def plane_bytes(e) -> int:
    return e.sm.length + e.e_length


def timed(reader: StoreReader, entries: list, bufs: list[tuple[np.ndarray, np.ndarray]], threads: int,
          verify: bool) -> float:
    """GB/s for `threads` threads reading both planes of `entries` (thread t takes every t-th one)."""
    start = threading.Barrier(threads + 1)
    failed: list[BaseException] = []

    def run(t: int) -> None:
        start.wait()
        sm_buf, e_buf = bufs[t]
        try:
            for e in entries[t::threads]:
                if verify:
                    reader.read_sm_into(e, sm_buf)
                    if e.e_length:
                        reader.read_e_into(e, e_buf)
                else:
                    read_direct_into(reader._fd, e.sm.offset, e.sm.length, sm_buf)
                    if e.e_length:
                        read_direct_into(reader._fd, e.e_offset, e.e_length, e_buf)
        except BaseException as exc:  # reported by the caller: a rate over unread bytes would be wrong
            failed.append(exc)

    pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    start.wait()
    t0 = time.perf_counter()
    for th in pool:
        th.join()
    if failed:
        raise failed[0]
    return sum(plane_bytes(e) for e in entries) / (time.perf_counter() - t0) / 1e9


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
            coder.decode_merge_into(blob, sm, np.empty(sm.size, dtype=np.uint16))  # compile before timing
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
    p.add_argument("--experts", type=int, default=64, help="experts per measurement")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    a = p.parse_args()
    shorten_switch_interval()  # as a loaded engine does (0.5 ms)
    reader = StoreReader(a.store)
    entries = list(reader.entries.values())
    order = np.random.default_rng(0).permutation(len(entries))
    n = max(a.threads)
    pinned = torch.cuda.is_available()
    sm_slab = HostSlab(n, reader.max_sm_bytes + 8192, pinned=pinned)
    e_slab = HostSlab(n, reader.max_e_region_bytes + 8192, pinned=pinned)
    plain = [(reader.new_sm_buffer(), reader.new_e_buffer()) for _ in range(n)]
    slots = list(zip(sm_slab.views, e_slab.views, strict=True))
    sm_mb = np.mean([e.sm.length for e in entries]) / 1e6
    e_mb = np.mean([e.e_length for e in entries]) / 1e6
    print(f"{a.store}: {len(entries)} experts; reads per expert: SM plane {sm_mb:.1f} MB + E region {e_mb:.1f} MB "
          f"(pinned slots: {pinned})")
    cases = [("bare", plain, False, None), ("verify", plain, True, None), ("pinned", slots, True, None),
             ("+python", slots, True, "python"), ("+decode", slots, True, "decode")]
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
    sm_slab.close()
    e_slab.close()
    restore_switch_interval()


if __name__ == "__main__":
    main()
