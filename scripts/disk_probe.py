"""O_DIRECT read rate of one file for 1, 2 and 4 concurrent streams and several read sizes.

The engine reads whole planes (8.6 MB SM planes, 17.3 MB raw experts on the Qwen shape) on its two I/O
threads, and during its reads it got ~1.57 GB/s where two 16 MiB streams measured 2.24 GB/s (BENCHMARKS.md,
fourth session). If one stream is much slower than two, a layer's last read running alone explains the
gap, and splitting large reads across the I/O threads would close it.

    python scripts/disk_probe.py runs/zb/store-raw/experts.bin [--total-mib 512]
"""

import argparse
from pathlib import Path

from zipmoe.bench.baselines.workdir import disk_bandwidth


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data_file", type=Path)
    p.add_argument("--total-mib", type=int, default=512, help="bytes per pass (two passes, the best counts)")
    a = p.parse_args()
    sizes = (2, 4, 8, 16)
    print("GB/s by streams (rows) and read size in MiB (columns):", *(f"{s:>6}" for s in sizes))
    for threads in (1, 2, 4):
        rates = [disk_bandwidth(a.data_file, chunk=s << 20, total=a.total_mib << 20, threads=threads, passes=2)
                 for s in sizes]
        print(f"{threads} stream(s)".ljust(55), *(f"{r / 1e9:6.2f}" for r in rates))


if __name__ == "__main__":
    main()
