"""End-to-end benchmark metrics: per-step probes, per-batch records, per-run summaries.

bench stage, runs on the thread that drives model.generate. In: the wall time and counters after
each model forward (engine counters for our systems, the OS's block-read counter for all);
out: plain dicts (JSON). A *record* is one batch of B prompts generated together; a *summary*
aggregates the records of one (system, budget, batch size): medians with 10–90 % bands over
records (= over prompts at batch 1), pooled throughput, bytes per token, hits per cache state,
I/O-stall share and the run's lower bounds (bytes read ÷ measured disk bandwidth; decode work ÷
decode workers). B=batch rows; times in s, sizes in bytes.
"""

from __future__ import annotations

import math
import resource
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATES = ("F", "C", "S", "E", "MISS")
_ENGINE_SUMS = ("bytes_read", "decode_s", "io_busy_s", "stall_s", "layer_s")


def band(values: Sequence[float | None]) -> dict[str, float | None]:
    """Median and 10th/90th percentiles of the finite values (None when there are none)."""
    v = [float(x) for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"median": None, "p10": None, "p90": None}
    p10, med, p90 = np.percentile(v, [10, 50, 90])
    return {"median": float(med), "p10": float(p10), "p90": float(p90)}


def proc_number(file: str, key: str, pid: int | str = "self", scale: int = 1) -> int | None:
    """One number of /proc/<pid>/<file> ("status" reports kB: scale=1024), or None where unreadable."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * scale
    except (OSError, ValueError):
        return None
    return None


def gpu_bytes_of(pid: int) -> int | None:
    """GPU memory another process holds now, as nvidia-smi reports it (torch's allocator counters only see
    this one); None without nvidia-smi or when it does not list the pid (another PID namespace, no GPU use)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = [int(mib) << 20 for p, mib in (line.split(",", 1) for line in out.splitlines() if "," in line)
            if p.strip() == str(pid) and mib.strip().isdigit()]
    return sum(used) if used else None


def os_read_bytes(pid: int | str = "self") -> int | None:
    """Bytes a process caused to be read from storage (page-cache hits excluded, mmap faults included);
    None if unknown."""
    return proc_number("io", "read_bytes", pid)


def cuda_allocator_counts() -> dict[str, int]:
    """Cumulative CUDA caching-allocator events (cudaMalloc'd / cudaFree'd segments, OOM retries); {}
    without CUDA. Recorded per run: a run that grows the allocator's pools pays cudaMalloc / cudaHostAlloc
    in its timed steps. (This ruled the allocator out as the first-engine slowness, which was cuDNN's
    per-shape attention graphs: BENCHMARKS.md, fourth session.)"""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    stats = torch.cuda.memory_stats()
    counts = {"cuda_segments_allocated": int(stats.get("segment.all.allocated", 0)),
              "cuda_segments_freed": int(stats.get("segment.all.freed", 0)),
              "cuda_alloc_retries": int(stats.get("num_alloc_retries", 0))}
    host_stats = getattr(torch.cuda, "host_memory_stats", None)  # the pinned-memory allocator (newer torch)
    if host_stats is not None:
        host = host_stats()
        counts["cuda_host_allocs"] = int(host.get("num_host_alloc", 0))
        counts["cuda_host_alloc_us"] = int(host.get("host_alloc_time.total", 0))
    return counts


class PeakMemory:
    """Peak host RSS and GPU memory over an interval: reset() at its start, read() at its end.

    Host: Linux's VmHWM, reset by writing 5 to /proc/self/clear_refs (falls back to the process-
    lifetime ru_maxrss, reported as such). GPU: torch's allocator peak (allocated and reserved).
    """

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.host_method = "VmHWM"

    def reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.host_method = "ru_maxrss (process lifetime)"
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def read(self) -> dict[str, Any]:
        host = proc_number("status", "VmHWM", scale=1024) if self.host_method == "VmHWM" else None
        if host is None:
            host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out: dict[str, Any] = {"peak_host_rss": host, "host_rss_method": self.host_method}
        if self.cuda:
            out["peak_gpu_allocated"] = int(torch.cuda.max_memory_allocated())
            out["peak_gpu_reserved"] = int(torch.cuda.max_memory_reserved())
        return out


class StepProbe:
    """Forward hooks that record, after every model forward, its wall time and the counters.

    counters() returns a flat dict of cumulative numbers (and a nested "hits" dict for our engine);
    records are differences of consecutive samples, so the probe needs no reset between batches.
    """

    def __init__(self, model: torch.nn.Module, counters: Callable[[], dict[str, Any]], cuda: bool):
        self.counters, self.cuda = counters, cuda
        self.steps: list[dict[str, Any]] = []
        self._t0 = 0.0
        self._handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        self._t0 = time.perf_counter()

    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()  # per-step times must include the GPU work they launched
        self.steps.append({"s": time.perf_counter() - self._t0, **self.counters()})

    def start(self) -> dict[str, Any]:
        """Forget earlier steps; the counters now (the base of the next batch's first step)."""
        self.steps = []
        return self.counters()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _diff(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in after.items():
        if key == "s" or key not in before or before[key] is None or value is None:
            continue
        if isinstance(value, dict):
            out[key] = {k: value[k] - before[key].get(k, 0) for k in value}
        else:
            out[key] = value - before[key]
    return out


def batch_record(base: dict[str, Any], steps: list[dict[str, Any]], *, rows: int, prompt_lens: list[int],
                 wall_s: float, disk_bytes_per_s: float, workers: int) -> dict[str, Any]:
    """One batch's numbers from the counters before it and the probe's per-step samples."""
    deltas = [_diff(s, p) for p, s in zip([base, *steps], steps, strict=False)]
    step_s = [s["s"] for s in steps]
    total = _diff(steps[-1], base) if steps else {}
    decode = deltas[1:]
    bytes_read = total.get("bytes_read", total.get("os_read_bytes"))
    decode_bytes = [d.get("bytes_read", d.get("os_read_bytes")) for d in decode]
    tokens = rows * len(steps)
    rec: dict[str, Any] = {
        "rows": rows, "prompt_lens": prompt_lens, "new_tokens": len(steps), "tokens": tokens,
        "e2e_s": wall_s, "ttft_s": step_s[0] if step_s else None,
        "tpot_s": float(np.median(step_s[1:])) if len(step_s) > 1 else None,
        "decode_s_wall": float(sum(step_s[1:])), "step_s": [round(x, 6) for x in step_s],
        "tok_per_s": tokens / wall_s if wall_s > 0 else None,
        "decode_tok_per_s": rows * (len(step_s) - 1) / sum(step_s[1:]) if len(step_s) > 1 else None,
        "bytes_read": bytes_read, "os_read_bytes": total.get("os_read_bytes"),
        "prefill_bytes_read": (deltas[0].get("bytes_read", deltas[0].get("os_read_bytes")) if deltas else None),
        "decode_step_bytes": band([b for b in decode_bytes if b is not None])["median"],
    }
    for key in _ENGINE_SUMS[1:]:
        rec[key] = total.get(key)
        if key in ("stall_s", "layer_s") and rec[key] is not None:  # decode-phase share, for the breakdown
            rec[f"decode_{key}"] = float(sum(d.get(key, 0.0) for d in decode))
    if "hits" in total:
        rec["hits"] = total["hits"]
        rec["decode_hits"] = {k: sum(d["hits"][k] for d in decode) for k in total["hits"]}
    rec.update(lower_bounds(rec, disk_bytes_per_s, workers))
    return rec


def lower_bounds(rec: dict[str, Any], disk_bytes_per_s: float, workers: int) -> dict[str, Any]:
    """The run's floors: its bytes at the measured disk bandwidth, its decode work on `workers` threads."""
    io = rec["bytes_read"] / disk_bytes_per_s if rec.get("bytes_read") is not None and disk_bytes_per_s else None
    dec = rec["decode_s"] / workers if rec.get("decode_s") is not None else None
    floor = max((x for x in (io, dec) if x is not None), default=None)
    step = rec.get("decode_step_bytes")
    return {
        "io_bound_s": io, "decode_bound_s": dec, "bound_s": floor,
        "bound_ratio": rec["e2e_s"] / floor if floor else None,  # measured ÷ floor (≥ 1)
        "tpot_io_bound_s": step / disk_bytes_per_s if step is not None and disk_bytes_per_s else None,
    }


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One (system, budget, batch size): bands over records, pooled rates and shares."""
    if not records:
        return {}
    tokens = sum(r["tokens"] for r in records)
    wall = sum(r["e2e_s"] for r in records)
    decode_tokens = sum(r["rows"] * (r["new_tokens"] - 1) for r in records)
    decode_wall = sum(r["decode_s_wall"] for r in records)
    out: dict[str, Any] = {
        "batches": len(records), "prompts": sum(r["rows"] for r in records), "tokens": tokens,
        "ttft_s": band([r["ttft_s"] for r in records]), "tpot_s": band([r["tpot_s"] for r in records]),
        "e2e_s": band([r["e2e_s"] for r in records]),
        "tok_per_s": tokens / wall if wall else None,
        "decode_tok_per_s": decode_tokens / decode_wall if decode_wall else None,
        "tpot_io_bound_s": band([r.get("tpot_io_bound_s") for r in records]),
    }
    out.update(_pooled(records, tokens, wall))
    return out


def _pooled(records: list[dict[str, Any]], tokens: int, wall: float) -> dict[str, Any]:
    def total(key: str) -> float | None:
        vals = [r.get(key) for r in records]
        return None if any(v is None for v in vals) else float(sum(vals))

    bytes_read, bound = total("bytes_read"), total("bound_s")
    stall, layer = total("stall_s"), total("layer_s")
    out: dict[str, Any] = {
        "bytes_read": bytes_read, "bytes_per_token": bytes_read / tokens if bytes_read is not None else None,
        "io_bound_s": total("io_bound_s"), "decode_bound_s": total("decode_bound_s"), "bound_s": bound,
        "bound_ratio": wall / bound if bound else None,
        "stall_s": stall, "layer_s": layer, "decode_s": total("decode_s"),
        "decode_stall_s": total("decode_stall_s"), "decode_layer_s": total("decode_layer_s"),
        "io_stall_share": stall / layer if stall is not None and layer else None,
        "prefill_s": sum(r["ttft_s"] or 0.0 for r in records),
        "decode_wall_s": sum(r["decode_s_wall"] for r in records),
    }
    if all("hits" in r for r in records):
        out["hit_rate"] = _rates([r["hits"] for r in records])
        out["decode_hit_rate"] = _rates([r["decode_hits"] for r in records])
    return out


def _rates(hit_dicts: list[dict[str, int]]) -> dict[str, float]:
    sums = {k: sum(h.get(k, 0) for h in hit_dicts) for k in STATES}
    served = sum(sums.values())
    return {k: v / served if served else 0.0 for k, v in sums.items()}


def nonfinite_paths(obj: Any, path: str = "") -> list[str]:
    """Paths of every non-finite float inside a JSON-like object (for checks and tests)."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [path]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in nonfinite_paths(v, f"{path}.{k}")]
    if isinstance(obj, list | tuple):
        return [p for i, v in enumerate(obj) for p in nonfinite_paths(v, f"{path}[{i}]")]
    return []


def trace_summary(trace: list, layers_per_step: int, prefetch_spans: Sequence[tuple[float, ...]] = ()) -> dict:
    """Where a run's decode-step time went, from Engine.trace (prefill's layer calls skipped; at any batch size:
    a layer call's reads are those of all its waves):
    medians per MoE layer call in ms. `before_first_read`: from the layer asking for its experts to its
    first read (lookup, planning, thread hand-off); `read_union`: time some read of the layer was in
    flight; `after_last_read`: last read done → layer done (decode tail, H2D copy, compute of the last
    experts); `between_layers`: the previous layer done → this one asking (attention, router, shared
    expert, Python; the first layer of a step also carries lm_head and generate()'s own work), split into
    `sync_wait` (the routing's device→host syncs blocked: device time, e.g. kernels or copies still queued)
    and `between_layers_host` (the rest). sync_wait is a lower bound on device time: other syncs in the gap
    (generate()'s stopping check before a step's first layer, attention masks) drain the queue first and
    count as host time. The same gap split by where the code runs: `experts_tail` (our experts forward after
    its last expert: the reference's matmuls and sum), `model_between` (the model's own code from one experts
    forward to the next: shared expert, norms, attention, router) and `experts_head` (our forward before
    asking: the next-layer hint, slot tables and the routing sync, so it also holds sync_wait, the device's
    backlog of the model's own kernels included).
    `disk_busy_share`: share of the decode steps' time with some read in flight, the layers' own and the
    prefetcher's (`prefetch_spans`: perf_counter (start, end, bytes) of each prefetch read); `prefetch_union`
    per step; `read_gb_per_s_in_flight`: the bytes those reads brought in ÷ that busy time, the rate the disk
    delivered while it was in use (prefetch reads counted when they end inside the steps)."""
    calls = trace[layers_per_step:]
    rows = []
    all_spans = [(a, b) for a, b, *_ in prefetch_spans]
    layer_bytes = sum(getattr(c, "read_bytes", 0) for c in calls)
    for prev, cur in zip(trace[layers_per_step - 1 :], calls, strict=False):
        spans = sorted((r.started_at + x.io_start, r.started_at + x.io_end) for r in cur.runs for x in r.experts
                       if not np.isnan(x.io_start))
        union, end = 0.0, -np.inf
        for a, b in spans:
            union += max(0.0, b - max(a, end))
            end = max(end, b)
        all_spans += spans
        row = {"layer_ms": cur.left - cur.entered, "between_layers_ms": cur.entered - prev.left,
               "reads": sum(1 for r in cur.runs for x in r.experts if not np.isnan(x.io_start)),
               "read_union_ms": union}
        wait = getattr(cur, "sync_wait_s", None)
        if wait is not None:
            row["sync_wait_ms"] = wait
            row["between_layers_host_ms"] = row["between_layers_ms"] - row["sync_wait_ms"]
        entered, left = getattr(cur, "forward_entered", None), getattr(cur, "previous_forward_left", None)
        if entered is not None and left is not None and prev.left <= left <= entered <= cur.entered:
            row["experts_tail_ms"] = left - prev.left
            row["model_between_ms"] = entered - left
            row["experts_head_ms"] = cur.entered - entered
        if spans:
            row["before_first_read_ms"] = spans[0][0] - cur.entered
            row["after_last_read_ms"] = cur.left - max(b for _, b in spans)
        rows.append(row)
    out = {"layer_calls": len(rows)}
    for k in ("layer_ms", "between_layers_ms", "sync_wait_ms", "between_layers_host_ms", "experts_tail_ms",
              "model_between_ms", "experts_head_ms", "read_union_ms", "before_first_read_ms", "after_last_read_ms",
              "reads"):
        vals = [r[k] * (1e3 if k.endswith("_ms") else 1) for r in rows if k in r]
        out[k] = float(np.median(vals)) if vals else None
        out[f"{k}_sum_per_step"] = sum(vals) * layers_per_step / len(rows) if vals else None
    if rows:
        lo, hi = trace[layers_per_step - 1].left, calls[-1].left
        clip = [(max(a, lo), min(b, hi)) for a, b in all_spans if b > lo and a < hi]
        steps = len(rows) / layers_per_step
        busy = _union(sorted(clip))
        out["disk_busy_share"] = busy / (hi - lo) if hi > lo else None
        inside = sorted((max(a, lo), min(b, hi)) for a, b, *_ in prefetch_spans if b > lo and a < hi)
        out["prefetch_union_ms_sum_per_step"] = _union(inside) * 1e3 / steps
        pf_bytes = sum(s[2] for s in prefetch_spans if len(s) > 2 and lo < s[1] <= hi)
        out["read_gb_per_s_in_flight"] = (layer_bytes + pf_bytes) / busy / 1e9 if busy > 0 else None
    return out


def _union(spans: Sequence[tuple[float, float]]) -> float:
    """Length of the union of sorted (start, end) intervals."""
    union, end = 0.0, -np.inf
    for a, b in spans:
        union += max(0.0, b - max(a, end))
        end = max(end, b)
    return union
