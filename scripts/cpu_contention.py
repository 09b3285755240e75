"""How a busy decode thread and torch's CPU thread pool slow each other, and whether a lower priority helps.

One numba thread (nogil) keeps a core busy, as a zipmoe decode worker does, at nice +N; the main thread
times a BF16 linear of one expert's gate_up shape (1×2048 @ 2048×2816) on torch's thread pool. Each torch
op waits for its slowest pool thread, so a pool thread that shares a core with the busy one waits for its
time slice. Prints median / p90 / mean ms per call, idle and beside the busy thread.

--worker-rate measures the other direction: the busy thread's work rate alone, then while the main thread
runs that linear and then waits (as the compute thread waits for the next expert), at each nice value.
OpenMP pool threads spin for a while after each op before they sleep, so they take cores from the worker
while the main thread waits. OMP_WAIT_POLICY=PASSIVE (set before the process starts) turns the spin off.

    python scripts/cpu_contention.py            # the busy thread at nice +0, +5, +10, +19
    python scripts/cpu_contention.py --worker-rate
    OMP_WAIT_POLICY=PASSIVE python scripts/cpu_contention.py --worker-rate
"""

import argparse
import os
import threading
import time

import numba
import numpy as np
import torch


@numba.njit(nogil=True)
def _burn(a: np.ndarray, n: int) -> int:
    s = 0
    for _ in range(n):
        for i in range(a.size):
            s += a[i] ^ (s >> 3)
    return s


def _time_linear(x: torch.Tensor, w: torch.Tensor, calls: int) -> str:
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        ts.append(time.perf_counter() - t0)
    mean = sum(ts) / len(ts)
    ts.sort()
    return f"median {ts[len(ts) // 2] * 1e3:.2f}  p90 {ts[int(len(ts) * 0.9)] * 1e3:.2f}  mean {mean * 1e3:.2f} ms"


def _worker_rate(data: np.ndarray, x: torch.Tensor, w: torch.Tensor, nice: int | None, seconds: float,
                 wait_s: float) -> float:
    """The busy thread's _burn calls per second; nice None: no torch work beside it."""
    stop, done = threading.Event(), []

    def busy() -> None:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + (nice or 0))
        n, t0 = 0, time.perf_counter()
        while not stop.is_set():
            _burn(data, 1)
            n += 1
        done.append(n / (time.perf_counter() - t0))

    t = threading.Thread(target=busy, daemon=True)
    t.start()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        if nice is not None:
            torch.nn.functional.linear(x, w)
        time.sleep(wait_s)
    stop.set()
    t.join()
    return done[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nice", type=int, nargs="+", default=[0, 5, 10, 19])
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--worker-rate", action="store_true", help="the busy thread's rate beside torch work instead")
    p.add_argument("--wait-ms", type=float, default=0.5, help="--worker-rate: the main thread's wait between ops")
    args = p.parse_args()
    data = np.random.default_rng(0).integers(0, 255, 1 << 20, dtype=np.uint8)
    _burn(data, 1)
    x = torch.randn(1, 2048).bfloat16()
    w = (torch.randn(2816, 2048) * 0.02).bfloat16()
    print(f"torch threads {torch.get_num_threads()}, cores {os.cpu_count()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    if args.worker_rate:
        alone = _worker_rate(data, x, w, None, 2.0, args.wait_ms / 1e3)
        print(f"worker alone: {alone:.1f} calls/s")
        for nice in args.nice:
            rate = _worker_rate(data, x, w, nice, 2.0, args.wait_ms / 1e3)
            print(f"worker at +{nice:<2} beside linear + {args.wait_ms} ms waits: {rate:.1f} calls/s "
                  f"({rate / alone:.2f} of alone)")
        return
    print(f"idle:                {_time_linear(x, w, args.calls)}")
    for nice in args.nice:
        stop = threading.Event()

        def busy(nice: int = nice, stop: threading.Event = stop) -> None:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
            while not stop.is_set():
                _burn(data, 4)

        t = threading.Thread(target=busy, daemon=True)
        t.start()
        time.sleep(0.05)
        print(f"busy thread at +{nice:<2}: {_time_linear(x, w, args.calls)}")
        stop.set()
        t.join()


if __name__ == "__main__":
    main()
