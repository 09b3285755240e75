"""Engine benchmark (issue 3): zipmoe vs the same engine over uncompressed experts with an LRU cache
vs plain transformers with everything on the device, same model, prompts, budget and routing.

Routing comes from the calibrated sampler (bench/routing.py) through a hook on every router, the
same sequence for every system (random-weight models route degenerately). Budgets are the dense
weights + staging + a fraction of the BF16 expert bytes. Reports TTFT, TPOT (median over decode
steps), throughput, bytes read, hits per state, and the run's lower bounds: bytes read ÷ measured
O_DIRECT disk bandwidth, and decode work ÷ workers.

    python -m zipmoe.bench.engine --workdir /tmp/zb --layers 6 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import itertools
import json
import os
import pstats
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from zipmoe.bench.baselines.base import PromptRouting, hook_routers  # every router class (issue 6)
from zipmoe.bench.baselines.workdir import disk_bandwidth, routing_profile_for
from zipmoe.bench.baselines.zipmoe_engine import store_geometry
from zipmoe.bench.cachesim import PerAccessLRFU
from zipmoe.bench.metrics import cuda_allocator_counts, trace_summary
from zipmoe.bench.routing import RoutingSampler
from zipmoe.bench.synth import build_synthetic
from zipmoe.cache import entry_bytes
from zipmoe.convert import convert
from zipmoe.engine import gil, late_merge, prefetch
from zipmoe.engine.metrics import EngineStats, StepClock
from zipmoe.models import compute
from zipmoe.models.compute import INDEX_COPY_MIN_SLOTS, PREFETCH_MAX_TOKENS
from zipmoe.models.load import load, unload
from zipmoe.planner.profile_io import stats_path
from zipmoe.store.reader import StoreReader
from zipmoe.types import State

# name -> zipmoe.load arguments. "zipmoe": the default (all-C split, LRFU eviction with admission, 0.5 ms
# GIL switch interval, two I/O threads); the others change one thing each (the ablation rows);
# "uncompressed-lru*" read the raw store with every budget byte in F, LRU (capacities set per budget).
SYSTEMS: dict[str, dict] = {
    "zipmoe": {},
    "zipmoe-prefetch": {"prefetch": True},
    "zipmoe-fused": {"late_merge": False},  # workers decode and merge each expert (the default on CPU, not on CUDA)
    "zipmoe-fused-prefetch": {"late_merge": False, "prefetch": True},
    "zipmoe-torchmerge": {"merge_kernel": "torch"},  # late merge as nine torch byte ops (before session 11)
    "zipmoe-perslot-copy": {"index_copy_min_slots": 1 << 30},  # batched_mm: one copy per slot (before session 11)
    "zipmoe-prefetch-1reader": {"prefetch": True, "prefetch_read_threads": 1},  # one read thread (before session 10)
    "zipmoe-4pools": {"pool_split": (0.25, 0.25, 0.25, 0.25)},  # the paper's "+ four pools" row: F/C/S/E, no planning
    "zipmoe-planned": {"planning": True},
    "zipmoe-planned-prefetch": {"planning": True, "prefetch": True},
    "zipmoe-planned-batch": {"planning": True, "plan_batch": "big"},  # planned for --big-batch (both batches run it)
    "zipmoe-lru": {"eviction": "lru"},
    "zipmoe-lrfu-per-access": {"eviction": PerAccessLRFU},  # LRFU before token weights (commit 9b372a9)
    "zipmoe-lru-prefetch": {"eviction": "lru", "prefetch": True},
    "zipmoe-fifo": {"eviction": "fifo"},
    "zipmoe-marking": {"eviction": "marking"},
    "zipmoe-1io": {"io_threads": 1},
    "zipmoe-3io": {"io_threads": 3},  # a third reader: fewer moments with every read back and waiting for the GIL?
    "zipmoe-stripe2": {"read_stripes": 2},  # each plane read of >= 8 MiB in two concurrent parts
    "zipmoe-prefetch-stripe2": {"prefetch": True, "read_stripes": 2},
    "uncompressed-lru-stripe2": {"eviction": "lru", "read_stripes": 2},
    "zipmoe-gil5ms": {"switch_interval_s": 0.005},
    "zipmoe-gil0.1ms": {"switch_interval_s": 0.0001},  # a read that returns waits at most ~0.1 ms for the GIL
    # half the decode workers: does the model's own code between layers (slower there than in plain
    # transformers, BENCHMARKS.md eighth session) run faster when fewer cores have just run the decoders?
    "zipmoe-4workers": {"workers": 4},
    # a layer's reads issued from native code (store/native_reads.py): no read waits for the GIL
    "zipmoe-native": {"native_reads": True},
    "zipmoe-native-prefetch": {"native_reads": True, "prefetch": True},
    "uncompressed-lru-native": {"eviction": "lru", "native_reads": True},
    # decode workers at nice +10 beside torch's CPU thread pool (the default is the process's own priority)
    "zipmoe-nice10": {"decode_nice": 10},
    "uncompressed-lru-nice10": {"eviction": "lru", "decode_nice": 10},
    "uncompressed-lru": {"eviction": "lru"},
}


class LookaheadRouting:
    """The calibrated routing, able to draw a layer's experts before its router runs.

    Each (request, layer) has its own random stream (bench/routing.py), so drawing layer l+1 early
    and serving it when its router asks gives exactly the sequence an un-peeked run gets.
    """

    def __init__(self, override: PromptRouting):
        self.override = override
        self._ahead: dict[int, np.ndarray] = {}

    @property
    def rows(self):
        return self.override.rows

    def begin(self, requests: list[int]) -> None:
        """Route the batch's rows as requests `requests` of the sampler: the same numbers give every
        system the same routing, draw for draw."""
        self._ahead.clear()
        self.override.begin_prompts(requests)

    def topk(self, layer: int, rows: int, seq: int) -> np.ndarray:
        ids = self._ahead.pop(layer, None)
        return ids if ids is not None and ids.shape[0] == rows * seq else self.override.topk(layer, rows, seq)

    def peek(self, layer: int, rows: int, seq: int) -> np.ndarray:
        self._ahead[layer] = self.override.topk(layer, rows, seq)
        return self._ahead[layer]


def oracle_hints(model, routing: LookaheadRouting, accuracy: float, seed: int) -> None:
    """Feed the engine's prefetcher the sampler's next-layer draws, each kept with probability
    `accuracy` (else a random expert). Bench only: the sampled routing is unrelated to the model's
    own routers, so router-based prediction cannot be measured on it. Results must say so."""
    engine = model.zipmoe_engine
    for m in model.modules():
        if hasattr(m, "_zipmoe_next"):
            m._zipmoe_next = None  # the model-side router prediction is replaced by these hints
    layers = sorted({k.layer for k in engine.reader.entries})
    following = dict(itertools.pairwise(layers))
    num_experts = len({k.expert for k in engine.reader.entries})
    rng = np.random.default_rng(seed)
    for name, module in model.named_modules():
        if not (name.endswith("mlp.gate") and hasattr(module, "weight")):
            continue
        layer = int(name.split("layers.")[1].split(".")[0])
        if layer not in following:
            continue

        def hook(mod, args, output, layer=layer):
            tokens = args[0].reshape(-1, args[0].shape[-1]).shape[0]
            rows = len(routing.rows)
            if tokens > PREFETCH_MAX_TOKENS:  # the model-side prediction's rule (a batch of 16 gets no hints)
                return
            ids = routing.peek(following[layer], rows, tokens // rows).reshape(-1)
            noisy = np.where(rng.random(ids.shape) < accuracy, ids, rng.integers(0, num_experts, ids.shape))
            engine.hint(following[layer], list(dict.fromkeys(noisy.tolist())))

        module.register_forward_hook(hook)


@contextlib.contextmanager
def torch_profile(directory: str | None, label: str):
    """torch.profiler over a run (CPU and, where present, CUDA activity), written as two op tables: by
    device time (what the device spent on copies and kernels) and by host self time (launch and Python
    cost). Timings under the profiler are inflated; read the tables for shares, not for TPOT."""
    if directory is None:
        yield
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        yield
    table = prof.key_averages()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    device_key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    prof.export_chrome_trace(str(out / f"torch-{label}.json.gz"))  # the timeline (gzipped by its suffix)
    (out / f"torch-{label}.txt").write_text(
        f"by {device_key}\n{table.table(sort_by=device_key, row_limit=40)}\n"
        f"by self_cpu_time_total\n{table.table(sort_by='self_cpu_time_total', row_limit=40)}\n")


WARMUP_REQUEST = 1 << 20  # request number of the untimed warm-up; measured batches use 0, 1, … (batch 1: 0)


def measure(model, override, vocab: int, batch: int, prompt_len: int, new_tokens: int, seed: int,
            first_request: int = 0) -> dict:
    stats = getattr(model, "zipmoe_engine", None)
    stats = stats.stats if stats is not None else EngineStats()
    if not hasattr(model, "zipmoe_engine"):
        clock = StepClock(stats)
        model.register_forward_pre_hook(clock.pre, with_kwargs=True)
        model.register_forward_hook(clock.post, with_kwargs=True)
    before, n0, alloc0 = stats.snapshot(), len(stats.step_s), cuda_allocator_counts()
    prefilled: list[int] = []  # bytes read once the prefill forward returned: the rest is the decode steps'
    hook = model.register_forward_hook(
        lambda *_: prefilled.append(stats.snapshot()["bytes_read"]) if not prefilled else None)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(model.device)
    override.begin(list(range(first_request, first_request + batch)))
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    finally:
        hook.remove()
    wall = time.perf_counter() - t0
    after, steps = stats.snapshot(), stats.step_s[n0:]
    allocator = {k: v - alloc0[k] for k, v in cuda_allocator_counts().items()}
    served = sum(after["hits"][k] - before["hits"][k] for k in after["hits"])
    return {
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "wall_s": wall,
        "ttft_s": steps[0], "tpot_s": statistics.median(steps[1:]),
        "tpot_p10_s": float(np.percentile(steps[1:], 10)), "tpot_p90_s": float(np.percentile(steps[1:], 90)),
        "decode_tok_per_s": batch * (len(steps) - 1) / sum(steps[1:]),
        "bytes_read": after["bytes_read"] - before["bytes_read"],
        "decode_bytes_read": after["bytes_read"] - prefilled[0], "decode_wall_s": sum(steps[1:]),
        "decode_s": after["decode_s"] - before["decode_s"],
        "stall_s": after["stall_s"] - before["stall_s"],
        "layer_s": after["layer_s"] - before["layer_s"],
        "hit_rate": {k: (after["hits"][k] - before["hits"][k]) / max(1, served) for k in after["hits"]},
        "experts_served": served,
        **allocator,
    }


def warm_shapes(model, override, cfg: dict, args, batches: list[tuple[int, int]]) -> float:
    """Run every measured shape (batch × prompt length × new tokens) once, untimed, on a model (the default
    system) that is then unloaded; returns the seconds it took. On CUDA, torch's cuDNN attention builds an
    execution graph the first time a thread meets each (batch, query length, key length): about 7 ms per
    attention call on the device, so a process's first decode of each length ran ~45 ms per step slower on a
    6-layer model (scripts/first_engine.py). Plain transformers pays the same. Paying it here, before any
    measured run, compares every system in the state of a process that has served these shapes before."""
    t0 = time.perf_counter()
    try:
        for i, (batch, new) in enumerate(batches):
            measure(model, override, cfg["vocab_size"], batch, args.prompt_len, new, args.seed + 2000,
                    first_request=WARMUP_REQUEST + 64 * (i + 1))
    finally:
        unload(model)
    return time.perf_counter() - t0


def run(args) -> dict:
    work = Path(args.workdir)
    hf = work / "hf"
    if not (hf / "model.safetensors.index.json").exists():
        build_synthetic(args.shape, hf, layers=args.layers, scale=args.scale, workers=args.workers + 1,
                        progress=False)
    shards = f"-k{args.shards}" if args.shards else ""  # another K is another store (the default K: none)
    stores = {"zipmoe": work / f"store-huffman{shards}", "uncompressed-lru": work / "store-raw"}
    timings = {}
    for name, coder in (("zipmoe", "huffman"), ("uncompressed-lru", "raw")):
        if not (stores[name] / "zipmoe.json").exists():
            t0 = time.perf_counter()
            convert(hf, stores[name], coder=coder, workers=args.workers + 1, progress=False,
                    shards=args.shards if coder == "huffman" else None)
            timings[f"convert_{coder}_s"] = time.perf_counter() - t0
    cfg = json.loads((hf / "config.json").read_text())
    with StoreReader(stores["zipmoe"]) as r:
        moe_layers = sorted({k.layer for k in r.entries})
        per_entry = entry_bytes(next(iter(r.entries.values())).numel, r.max_e_region_bytes)
    # the same budget arithmetic as bench e2e: dense + load()'s largest staging + a share of the expert bytes
    geom = store_geometry(stores["zipmoe"], args.device)
    n_entries, numel, dense, staging = geom["entries"], geom["numel"], geom["dense"], geom["staging"]
    stored, expert_bf16 = geom["expert_stored"], geom["expert_bf16"]
    bw = disk_bandwidth(stores["uncompressed-lru"] / "experts.bin")
    result = {"shape": args.shape, "layers": cfg["num_hidden_layers"], "experts": n_entries, "shards": args.shards,
              "expert_bf16_bytes": expert_bf16, "stored_expert_bytes": stored, "dense_bytes": dense,
              "disk_bytes_per_s": bw, "workers": args.workers, "device": args.device,
              "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              **timings, "runs": []}
    sampler = RoutingSampler(routing_profile_for(args.shape), n_entries // len(moe_layers),
                             cfg["num_experts_per_tok"], len(moe_layers), seed=args.seed, layer_ids=moe_layers)
    override = LookaheadRouting(PromptRouting(sampler))
    batches = [(1, args.new_tokens)] + ([(args.big_batch, args.big_batch_tokens)] if args.big_batch > 0 else [])
    runs = [tuple(r.split(":")) for r in args.runs] if args.runs else [
        (name, str(frac)) for frac in args.budgets for name in args.systems]

    def load_system(name: str, frac: float):
        store = stores["uncompressed-lru" if name.startswith("uncompressed-lru") else "zipmoe"]
        budget, extra = dense + staging + int(frac * expert_bf16), dict(SYSTEMS[name])
        if frac >= 1.0:  # everything fits: the default budget, every expert preloaded decoded
            budget = None
        elif name.startswith("uncompressed-lru"):  # every budget byte holds decoded experts, LRU
            extra["capacities"] = {State.F: int(frac * expert_bf16) // (2 * numel)}
        if "pool_split" in extra:  # a fixed share of the expert bytes per pool (F, C, S, E)
            split = extra.pop("pool_split")
            extra["capacities"] = {p: int(share * frac * expert_bf16) // per_entry[p]
                                   for p, share in zip((State.F, State.C, State.S, State.E), split, strict=True)}
        if extra.get("plan_batch") == "big":
            if args.big_batch < 2:
                raise SystemExit(f"{name} plans for --big-batch; give one of at least 2")
            extra["plan_batch"] = args.big_batch
        if extra.get("planning"):  # every planned row starts from the same prior, not from the routing
            stats_path(store).unlink(missing_ok=True)  # statistics an earlier row saved next to the store
        switch = extra.pop("switch_interval_s", gil.ENGINE_SWITCH_INTERVAL_S)
        readers = extra.pop("prefetch_read_threads", prefetch.READ_THREADS)
        kernel = extra.pop("merge_kernel", late_merge.MERGE_KERNEL)
        # read by the experts forward at every call: it holds for the row's whole run (reset when it unloads)
        compute.INDEX_COPY_MIN_SLOTS = extra.pop("index_copy_min_slots", INDEX_COPY_MIN_SLOTS)
        saved = gil.ENGINE_SWITCH_INTERVAL_S, prefetch.READ_THREADS, late_merge.MERGE_KERNEL
        gil.ENGINE_SWITCH_INTERVAL_S, prefetch.READ_THREADS, late_merge.MERGE_KERNEL = switch, readers, kernel
        try:
            model = load(store, device=args.device, memory_budget=budget, **{"workers": args.workers, **extra})
        finally:
            gil.ENGINE_SWITCH_INTERVAL_S, prefetch.READ_THREADS, late_merge.MERGE_KERNEL = saved
        hook_routers(model, override)
        return model, extra

    for name, _ in runs:
        if name not in SYSTEMS:
            raise SystemExit(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
    if runs and args.warm_shapes and args.device == "cuda":
        # the default system: a planned one would save routing statistics that later planned runs start from
        result["warm_shapes_s"] = warm_shapes(load_system("zipmoe", float(runs[0][1]))[0], override, cfg, args,
                                              batches)
    for name, frac_s in runs:
        frac = float(frac_s)
        model, extra = load_system(name, frac)
        if extra.get("prefetch"):
            oracle_hints(model, override, args.prefetch_accuracy, args.seed)
        try:
            measure(model, override, cfg["vocab_size"], 1, 8, 2, args.seed + 1000, WARMUP_REQUEST)  # warm-up
            for batch, new in batches:
                profiler = cProfile.Profile() if args.profile and batch == 1 else None
                engine = getattr(model, "zipmoe_engine", None)
                if engine is not None and args.trace:
                    engine.trace = []
                    if engine.prefetcher is not None:
                        engine.prefetcher.read_spans = []
                if profiler:
                    profiler.enable()
                profiled = args.torch_profile if batch == 1 else None
                with torch_profile(profiled, f"{name}-{frac}{shards}"):
                    m = measure(model, override, cfg["vocab_size"], batch, args.prompt_len, new, args.seed,
                                first_request=0 if batch == 1 else 1)
                m["torch_profiled"] = profiled is not None  # its times are inflated: not a TPOT to report
                if profiler:
                    profiler.disable()
                    out = io.StringIO()
                    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(40)
                    Path(args.profile).mkdir(parents=True, exist_ok=True)
                    (Path(args.profile) / f"profile-{name}-{frac}.txt").write_text(out.getvalue())
                if engine is not None and engine.trace is not None:
                    spans = engine.prefetcher.read_spans if engine.prefetcher is not None else None
                    m["trace"] = trace_summary(engine.trace, len(moe_layers), spans or ())
                    engine.trace = None
                    if engine.prefetcher is not None:
                        engine.prefetcher.read_spans = None
                pools, prefetcher = model.zipmoe_engine.pools, model.zipmoe_engine.prefetcher
                if prefetcher is not None:
                    m["prefetch"] = {**prefetcher.counters.snapshot(), "hints": "sampler oracle",
                                     "accuracy": args.prefetch_accuracy}
                m.update(system=name, budget_frac=frac, memory_budget=model.zipmoe_engine.cache.budget.total,
                         capacities={p.name: c for p, c in model.zipmoe_engine.cache.capacity.items()},
                         merge=model.zipmoe_engine.merge_path,
                         plan=pools.plan.describe() if pools else None,
                         io_bound_s=m["bytes_read"] / bw, decode_io_bound_s=m["decode_bytes_read"] / bw,
                         decode_bound_s=m["decode_s"] / args.workers)
                result["runs"].append(m)
                print(json.dumps({k: v for k, v in m.items() if k != "hit_rate"}), m["hit_rate"], flush=True)
                if args.json:  # after every run: a device call cut short still returns what it measured
                    Path(args.json).write_text(json.dumps(result, indent=1))
        finally:
            unload(model)
            compute.INDEX_COPY_MIN_SLOTS = INDEX_COPY_MIN_SLOTS
    if runs:  # the disk's rate drifts (±30 % within one device call): the bound uses the faster measurement
        result["disk_bytes_per_s_after"] = bw_after = disk_bandwidth(stores["uncompressed-lru"] / "experts.bin")
        for m in result["runs"]:
            m["io_bound_best_s"] = m["bytes_read"] / max(bw, bw_after)
            m["decode_io_bound_best_s"] = m["decode_bytes_read"] / max(bw, bw_after)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    if args.device == "cuda" and not args.skip_reference:
        ref = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.bfloat16).to("cuda")
        hook_routers(ref, override)
        measure(ref, override, cfg["vocab_size"], 1, 8, 2, args.seed + 1000, WARMUP_REQUEST)  # as for the others
        for batch, new in batches:
            profiled = args.torch_profile if batch == 1 else None
            with torch_profile(profiled, "transformers-all-on-gpu"):
                m = measure(ref, override, cfg["vocab_size"], batch, args.prompt_len, new, args.seed,
                            first_request=0 if batch == 1 else 1)
            m.update(system="transformers-all-on-gpu", budget_frac=1.0, torch_profiled=profiled is not None)
            result["runs"].append(m)
            print(json.dumps(m), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zipmoe bench engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--shape", default="qwen1.5-moe-a2.7b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--scale", type=float, default=1.0, help="shrink hidden/intermediate sizes (quick runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--shards", type=int, default=None,
                   help="exponent shards per expert of the compressed store (default: convert's); the last read "
                        "expert's decode is split K ways, so K above the workers' count shortens no tail")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5],
                   help="expert budgets as fractions of the BF16 expert bytes; >= 1 means everything fits")
    p.add_argument("--systems", nargs="+", default=["zipmoe", "zipmoe-prefetch", "zipmoe-planned", "uncompressed-lru"],
                   choices=list(SYSTEMS))
    p.add_argument("--runs", nargs="+", default=None, metavar="SYSTEM:BUDGET",
                   help="explicit (system, budget) pairs in this order, instead of --systems × --budgets")
    p.add_argument("--prefetch-accuracy", type=float, default=0.85,
                   help="zipmoe-prefetch: share of next-layer experts the (sampler-oracle) hints get right")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--big-batch", type=int, default=16, help="second batch size measured (0: batch 1 only)")
    p.add_argument("--big-batch-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--skip-reference", action="store_true", help="do not run plain transformers (CUDA) at the end")
    p.add_argument("--warm-shapes", type=int, choices=(0, 1), default=1,
                   help="first run every measured shape once untimed (CUDA attention builds a graph per shape)")
    p.add_argument("--trace", action="store_true",
                   help="record where decode time goes (per-layer medians; every batch size)")
    p.add_argument("--profile", default=None, help="directory for cProfile reports of the batch-1 runs")
    p.add_argument("--torch-profile", default=None,
                   help="directory for torch.profiler op tables (device, host time) and timelines of the batch-1 runs")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch's intra-op threads for every run (default: torch's own, one per core); on a CPU "
                        "fewer leave cores to the decode workers (set for the whole process, model building and "
                        "conversion too). OMP_WAIT_POLICY=PASSIVE in the environment stops the pool's threads "
                        "spinning after each op (scripts/cpu_contention.py)")
    args = p.parse_args(argv)
    if args.torch_threads is not None:
        if args.torch_threads < 1:
            p.error(f"--torch-threads must be at least 1, got {args.torch_threads}")
        torch.set_num_threads(args.torch_threads)
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
