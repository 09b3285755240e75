"""Host-side view of a torch.profiler timeline (bench/engine.py --torch-profile writes torch-*.json.gz): on the
thread that ran the attention calls, how much of each decode layer's wall time is spent inside ops and how
much outside them (Python, waits), per decoder layer and summed over layers.

    python scripts/timeline_gaps.py tp/torch-zipmoe-0.25.json.gz tp/torch-transformers-all-on-gpu.json.gz

Layers are delimited by attention calls (one per decoder layer); the last `--layers-per-step × --steps`
of them are reported (decode steps at the end of the run, prefill excluded). The profiler inflates every op
(~20–100 µs each on the device), so compare two timelines taken the same way, not absolute times.
Eighth session, zipmoe at 25 % (call 2's timeline, not kept in the repo): per layer 21.6 ms of wall time, 3.3 ms
of it inside 130 ops; the rest is mostly waiting for its reads, so compare "inside ops" and the op count with
plain transformers' timeline (the same command writes torch-transformers-all-on-gpu.json.gz without
--skip-reference).

With two timelines, `--compare` also prints, for the ops and GPU kernels both ran, the median duration of one
call in each and their ratio: the same op slower on the host in zipmoe's process points at the CPU side
(frequency, caches), the same kernel slower on the device at the GPU's clocks while it idles between reads.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import itertools
import json
import statistics


def top_level_ops(path: str) -> list[dict]:
    """CPU ops of the thread that ran the attention calls (the model's), not nested in another op, in order."""
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
    if not events:
        raise SystemExit(f"{path}: no cpu_op events (was it written by torch.profiler?)")
    attention = collections.Counter(e["tid"] for e in events if "attention" in e["name"])
    tid = (attention or collections.Counter(e["tid"] for e in events)).most_common(1)[0][0]
    ops, end = [], float("-inf")
    for e in sorted((e for e in events if e["tid"] == tid), key=lambda e: (e["ts"], -e["dur"])):
        if e["ts"] >= end:
            ops.append(e)
            end = e["ts"] + e["dur"]
    return ops


def layer_windows(ops: list[dict], count: int) -> list[tuple[list[dict], float]]:
    """The last `count` windows from one attention call to the next: (the decoder layer's ops, when the next
    attention call began)."""
    starts = [i for i, e in enumerate(ops) if "attention" in e["name"]]
    pairs = list(itertools.pairwise(starts))[-count:]
    return [(ops[a:b], ops[b]["ts"]) for a, b in pairs]


def summarize(path: str, count: int) -> dict:
    found = layer_windows(top_level_ops(path), count)
    if not found:
        raise SystemExit(f"{path}: fewer than two attention calls on its busiest thread")
    windows = [w for w, _ in found]
    wall = [(end - w[0]["ts"]) / 1e3 for w, end in found]
    inside = [sum(e["dur"] for e in w) / 1e3 for w in windows]
    by_op: collections.Counter = collections.Counter()
    for w in windows:
        for e in w:
            by_op[e["name"]] += e["dur"] / 1e3 / len(windows)
    return {"layers": len(windows), "wall_ms": statistics.median(wall), "in_ops_ms": statistics.median(inside),
            "outside_ops_ms": statistics.median(a - b for a, b in zip(wall, inside, strict=True)),
            "ops_per_layer": statistics.median(len(w) for w in windows), "top_ops_ms": by_op.most_common(8)}


def median_durations(path: str) -> dict[str, dict[str, tuple[float, int]]]:
    """Per name, (median µs of one call, calls): the model thread's top-level CPU ops, and every GPU kernel."""
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        kernels = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "kernel"]
    out: dict[str, dict[str, tuple[float, int]]] = {}
    for kind, events in (("op", top_level_ops(path)), ("kernel", kernels)):
        by_name: dict[str, list[float]] = collections.defaultdict(list)
        for e in events:
            by_name[e["name"]].append(e["dur"])
        out[kind] = {n: (statistics.median(d), len(d)) for n, d in by_name.items()}
    return out


def compare(first: str, second: str, top: int = 12) -> list[tuple[str, str, float, float, float]]:
    """(kind, name, median µs in first, in second, first ÷ second) for the names both ran, most called first."""
    a, b = median_durations(first), median_durations(second)
    rows = []
    for kind in ("op", "kernel"):
        shared = sorted(set(a[kind]) & set(b[kind]), key=lambda n: -min(a[kind][n][1], b[kind][n][1]))[:top]
        rows += [(kind, n, a[kind][n][0], b[kind][n][0], a[kind][n][0] / b[kind][n][0] if b[kind][n][0] else
                  float("inf")) for n in shared]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("timelines", nargs="+")
    p.add_argument("--layers-per-step", type=int, default=6)
    p.add_argument("--steps", type=int, default=4, help="decode steps at the end of each run to report")
    p.add_argument("--compare", action="store_true", help="two timelines: per-call medians of shared ops/kernels")
    p.add_argument("--top", type=int, default=12, help="--compare: ops and kernels listed, most called first")
    a = p.parse_args()
    if a.compare and len(a.timelines) != 2:
        p.error("--compare takes exactly two timelines (e.g. zipmoe's, then plain transformers')")
    for path in a.timelines:
        s = summarize(path, a.layers_per_step * a.steps)
        print(f"{path}: {s['layers']} layers; per layer (median): wall {s['wall_ms']:.2f} ms, inside ops "
              f"{s['in_ops_ms']:.2f} ms, outside {s['outside_ops_ms']:.2f} ms, {s['ops_per_layer']:.0f} ops")
        for name, ms in s["top_ops_ms"]:
            print(f"    {ms:7.3f} ms  {name}")
    if a.compare:
        print(f"per call, median µs: {a.timelines[0]} | {a.timelines[1]} | ratio")
        for kind, name, x, y, r in compare(*a.timelines, top=a.top):
            print(f"  {kind:6s} {x:9.1f} {y:9.1f} {r:6.2f}×  {name[:90]}")


if __name__ == "__main__":
    main()
