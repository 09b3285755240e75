"""Decode+merge scaling of the huffman coder with threads (device diagnostics): GB/s of BF16 out."""
import sys
import threading
import time

import numpy as np

from zipmoe.codec.coders import get_coder
from zipmoe.codec.shards import encode_expert, shard_bounds

rng = np.random.default_rng(0)
numel = 2048 * 1408 * 3
f = (rng.standard_normal(numel) * 0.02).astype(np.float32)
u16 = (f.view(np.uint32) >> 16).astype(np.uint16)
coder = get_coder("huffman")
sm, shards = encode_expert(u16, coder, 8)
bounds = shard_bounds(numel, len(shards))
jobs = [(i, s) for i in range(8) for s in range(len(shards))]  # 8 experts' worth of shard jobs
outs = [np.empty(numel, np.uint16) for _ in range(8)]
for threads in [int(t) for t in sys.argv[1:]] or [1, 4, 8, 15]:
    def work(my):
        for e, s in my:
            lo, hi = bounds[s]
            coder.decode_merge_into(shards[s], sm[lo:hi], outs[e][lo:hi])
    work(jobs[:8])
    best = 1e9
    for _ in range(3):
        ts = [threading.Thread(target=work, args=(jobs[i::threads],)) for i in range(threads)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        best = min(best, time.perf_counter() - t0)
    assert np.array_equal(outs[0], u16)
    rate = 8 * numel * 2 / best / 1e9
    print(f"threads {threads:2d}: {rate:6.2f} GB/s BF16 out ({rate / threads:.2f} per thread)")
