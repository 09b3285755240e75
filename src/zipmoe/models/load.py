"""load(store, device, memory_budget): a transformers model whose routed experts come from the engine.

Arrow: store/ → (dense weights resident, Engine over the expert planes) → HF model, generate() unchanged.
Runs once on the caller's thread; the returned model owns the engine (model.zipmoe_engine) and its
threads, released by `unload(model)` or when the model is garbage-collected.
Sizes in bytes.
"""

from __future__ import annotations

import functools
import logging
import numbers
import os
import weakref
from collections.abc import Callable

import torch
from safetensors.torch import load_file

from zipmoe.cache import ExpertCache, MemoryBudget, entry_bytes, uniform_numel
from zipmoe.codec.coders import get_coder
from zipmoe.config import format_size
from zipmoe.engine.engine import Engine, ExpertShapes
from zipmoe.engine.heap import freeze_loaded_objects, release_frozen
from zipmoe.engine.metrics import StepClock
from zipmoe.engine.planning import PlannedPools
from zipmoe.engine.prefetch import Prefetcher
from zipmoe.errors import UnsupportedModelError, ZipMoEError
from zipmoe.models import compute, per_expert
from zipmoe.models.base import ModuleAdapter
from zipmoe.models.build import build_model_without_experts
from zipmoe.models.registry import get_adapter
from zipmoe.scheduler.executor import Executor
from zipmoe.scheduler.tasks import CostModel
from zipmoe.store.native_reads import available as native_reads_available
from zipmoe.store.reader import StoreReader
from zipmoe.types import State

log = logging.getLogger("zipmoe")

# Conservative defaults until the planner's profiler measures this machine (issue 4); they only
# steer the order of work inside a layer, never what is computed.
DEFAULT_COSTS = CostModel(
    disk_bytes_per_s=1.5e9, disk_latency_s=1e-4, decode_bytes_per_s=1.0e9, merge_bytes_per_s=6e9, compute_s=5e-4
)


def default_workers() -> int:
    """Decode workers: every core but the compute thread's, at most 8.

    More threads only add GIL contention for the I/O and compute threads: on the 16-core device
    8 workers already decode 10.8 GB/s of BF16, several times the disk (2026-11-28).
    """
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def load(
    store: str | os.PathLike,
    device: str | torch.device = "cpu",
    memory_budget: int | str | None = None,
    *,
    workers: int | None = None,
    io_threads: int = 2,
    native_reads: bool | None = None,
    read_stripes: int = 1,
    eviction: str = "lrfu",
    staging_slots: int | None = None,
    direct_io: bool | None = None,
    experts_implementation: str | None = None,
    read_bytes_per_s: float | None = None,
    costs: CostModel = DEFAULT_COSTS,
    capacities: dict[State, int] | None = None,
    planning: bool = False,
    plan_batch: int = 1,
    prefetch: bool = False,
    late_merge: bool | None = None,
    decode_nice: int = 0,
    preload: bool | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> torch.nn.Module:
    """Load a zipmoe store as a transformers causal LM (seq2seq LM for encoder-decoder models) whose routed
    experts are served by the engine.

    workers: decode threads (default: cores − 1, at most 8); io_threads: threads of the read channel
    (two keep a read in flight while the other hands its result on); native_reads: issue each layer's reads
    from native code on io_threads streams (store/native_reads.py), and the prefetcher's in native calls
    that go from part to part, so that no read waits for the GIL while the model's Python runs; Linux only,
    not with read_bytes_per_s or read_stripes > 1. None (default) = off
    (ZIPMOE_NATIVE_READS=1 turns it on for a process): on the GPU machine it tied with Python reads
    (BENCHMARKS.md, thirteenth session); the same bytes either way. read_stripes: split each plane read
    of 8 MiB or more into this many concurrent parts, so even a layer's last read keeps several requests
    at the disk (1, the default: whole-plane reads; whether 2 helps depends on the disk, measure it with
    scripts/disk_probe.py). eviction: "lrfu" (decayed
    frequency with an admission filter, cache/policy.py), "lru", "lfu", "fifo" or "marking".
    memory_budget: everything the engine holds (dense weights, expert pools, staging), bytes or a
    string like "6GiB"; None = enough to keep every expert decoded. experts_implementation: the
    transformers implementation results are bit-exact to ("eager", "grouped_mm" or "batched_mm"; None = what
    from_pretrained picks). read_bytes_per_s caps disk reads to emulate a slower SSD (benchmarks
    must say when they use it). capacities: entries per pool (F/C/S/E) instead of the default split,
    e.g. {State.F: n} for a plain uncompressed LRU cache. planning: when the budget cannot hold every
    expert decoded, size the pools from routing statistics and this machine's measured costs
    (engine/planning.py) instead of the default all-C split. Off by default: on the device, whose cores
    decode several times faster than its disk reads, a plan made for its batch size was within 2 % of
    all-C (BENCHMARKS.md, seventh session); it pays where decode is slow. plan_batch: requests decoded
    together that the plan is made for (a server's batch size; the pools are sized for the union of that
    many requests' experts per layer call); only with planning=True. prefetch: read the
    next MoE layer's predicted experts (its router applied to this layer's hidden states) while the
    disk would idle; outputs are unchanged, the read-ahead slots come out of the budget. late_merge: the
    decode workers write exponents only, without waiting for an expert's SM read, and the compute device
    merges the two planes when both are in (engine/late_merge.py). None (default) = on for CUDA, where it took
    18 % off batch-1 TPOT (BENCHMARKS.md, ninth session), off for a CPU, where the merge would run on the
    compute thread; the same bits either way. decode_nice: how much lower than the process's the decode
    workers' CPU priority is (Linux nice increments; default 0). +10 frees torch's CPU thread pool from
    waiting for a busy worker's time slice, but on a 16-core CPU it tied on TPOT and cost 21 % TTFT
    (BENCHMARKS.md, seventeenth session). preload:
    read every expert at load (None = when the budget holds every expert decoded, as plain
    from_pretrained would). progress: called as progress(stage, done, total) when each loading stage
    starts and once more at the end with done == total, for a progress bar; None (default) = silent.
    """
    device = torch.device(device)
    if isinstance(plan_batch, bool) or not isinstance(plan_batch, numbers.Integral) or plan_batch < 1:
        raise ZipMoEError(f"plan_batch must be a positive int (requests decoded together), got {plan_batch!r}")
    if plan_batch != 1 and not planning:
        raise ZipMoEError("plan_batch sizes planned pools: pass planning=True with it, or leave it out")
    freeze_loaded_objects()  # the pending full GC pass happens now, not in the first request (engine/heap.py)
    reader = None
    try:
        reader = StoreReader(store, direct_io=direct_io, read_stripes=read_stripes, readers=io_threads + 1)
        native = _native_reads(native_reads, read_bytes_per_s, read_stripes)
        return _load(reader, device, memory_budget, workers, io_threads, eviction, staging_slots,
                     experts_implementation, read_bytes_per_s, costs, capacities, planning, plan_batch, prefetch,
                     late_merge, preload, progress=_Stages(progress), native_reads=native,
                     decode_nice=decode_nice)
    except BaseException:
        if reader is not None:
            reader.close()
        release_frozen()
        raise


def _native_reads(asked: bool | None, read_bytes_per_s: float | None, read_stripes: int) -> bool:
    """Whether the executor reads natively: what was asked, checked against what native reads cannot do.
    None: ZIPMOE_NATIVE_READS=1 or 0 if set (a benchmark's A/B for a whole process), else off; where native
    reads cannot run, None falls back to Python reads and only an explicit True is an error."""
    why_not = ("read_bytes_per_s caps reads in Python" if read_bytes_per_s else
               "read_stripes > 1 splits reads in Python" if read_stripes > 1 else
               None if native_reads_available() else "they need Linux (libc pread)")
    if asked is None:
        return os.environ.get("ZIPMOE_NATIVE_READS", "0") == "1" and why_not is None
    if asked and why_not:
        raise ZipMoEError(f"native_reads=True is not possible here: {why_not}; pass native_reads=False")
    return asked


def _load(reader, device, memory_budget, workers, io_threads, eviction, staging_slots, experts_implementation,
          read_bytes_per_s, costs, capacities, planning, plan_batch, prefetch, late_merge, preload,
          progress: _Stages, native_reads: bool = False, decode_nice: int = 0):
    entries = list(reader.entries.values())
    if any(e.mode != "split" for e in entries):
        raise UnsupportedModelError("this store keeps some experts raw (non-BF16); the engine serves BF16 experts only")
    if late_merge is None:
        late_merge = device.type == "cuda"
    elif late_merge and device.type == "cpu":
        log.warning("zipmoe: late_merge=True on a CPU merges on the compute thread, slower than the default "
                    "(engine/late_merge.py); it is meant for GPUs")
    adapter = get_adapter(reader.config.get("model_type"))
    per_module = isinstance(adapter, ModuleAdapter)  # one nn.Module per expert (models/per_expert.py)
    if prefetch and per_module:
        raise UnsupportedModelError(
            f"prefetch=True is not available for {adapter.model_type}: it predicts the next MoE layer's experts "
            "with the router of a fused experts layer, which this model does not have; leave prefetch off")
    if per_module:  # before any work: these models have one implementation
        per_expert.check_reference(adapter, experts_implementation)
    shapes = ExpertShapes.of(entries[0])
    numel = uniform_numel(e.numel for e in entries)
    e_slot = reader.max_e_region_bytes
    dense = {}
    progress.total = len(reader.manifest.dense_files) + 5
    progress("verifying dense weights")
    for path in reader.dense_files():
        progress("loading dense weights")
        dense.update(load_file(str(path), device=str(device)))
    progress("allocating the expert cache")
    dense_bytes = sum(t.numel() * t.element_size() for t in dense.values())
    n_experts = len({e.key.expert for e in entries})
    top_k = adapter.top_k(reader.config) if per_module else _top_k(reader.config)
    slots = staging_slots or max(1, min(n_experts, 2 * top_k))
    per_entry = entry_bytes(numel, e_slot)
    staging = Engine.staging_bytes(slots, numel, per_entry[State.S], per_entry[State.E], device, late_merge)
    prefetch_bytes = Prefetcher.nbytes(top_k, per_entry[State.S], per_entry[State.E]) if prefetch else 0
    if memory_budget is None:  # room for every expert decoded (and the read-ahead slots)
        budget = MemoryBudget(dense_bytes + staging + prefetch_bytes + len(entries) * per_entry[State.F])
    else:
        budget = MemoryBudget(memory_budget)
    budget.reserve("dense", dense_bytes)
    budget.reserve("staging", staging)  # the pools are sized around it; the engine allocates it below
    if prefetch:
        budget.reserve("prefetch", prefetch_bytes)
    workers = workers or default_workers()
    pools = None
    fits = budget.free() >= len(entries) * per_entry[State.F]
    if capacities is not None:
        capacities = {p: capacities.get(p, 0) for p in (State.F, State.C, State.S, State.E)}
    elif planning and not fits:
        pools = PlannedPools(reader, device.type, workers, top_k, budget.free(), batch=plan_batch,
                             late_merge=late_merge)
        capacities, costs = pools.plan.capacities, pools.costs
    cache = ExpertCache(budget, numel, e_slot, device, n_experts=len(entries), eviction=eviction,
                        capacities=capacities, admission=pools.admission if pools else None)
    budget.release("staging")
    executor = prefetcher = None
    try:
        coder = get_coder(reader.manifest.codec_id, **reader.manifest.codec_params)
        executor = Executor(workers, io_threads, native_reads=native_reads, decode_nice=decode_nice)
        prefetcher = Prefetcher(reader, top_k, per_entry[State.S], per_entry[State.E],
                                pinned=device.type == "cuda", native=native_reads) if prefetch else None
        engine = Engine(reader, cache, executor, coder, costs, device, shapes, slots, read_bytes_per_s, pools,
                        prefetcher, late_merge=late_merge)
    except BaseException:  # nothing may keep running (threads) or held (slabs) after a failed load
        for part in (executor, prefetcher, cache):
            if part is not None:
                part.close()
        raise
    try:
        progress("compiling the decoders")
        engine.warmup()
        progress("preloading experts")
        if preload or (preload is None and fits and capacities is None):
            engine.preload()
        progress("building the model")
        model = build_model_without_experts(reader.path, dense, device, None, experts_implementation)
        if per_module:
            per_expert.install(model, engine, adapter, experts_implementation)
            serve_resident = functools.partial(per_expert.serve_resident, adapter=adapter)
            release_resident = functools.partial(per_expert.release_resident, adapter=adapter)
        else:
            _check_expert_shapes(model, shapes)
            compute.install(model, engine)
            serve_resident, release_resident = compute.serve_resident, compute.release_resident
        # everything preloaded in place: the model's own kernels run on the F pool, no per-step engine work
        engine.resident = serve_resident(model, engine)
        if engine.resident:  # closing the engine (unload, or directly) takes the pool views back
            model_ref = weakref.ref(model)
            engine.on_close.append(lambda: (m := model_ref()) is not None and release_resident(m))
        progress.finish()
    except BaseException:
        engine.close()
        raise
    try:
        clock = StepClock(engine.stats)
        model.register_forward_pre_hook(clock.pre, with_kwargs=True)
        model.register_forward_hook(clock.post, with_kwargs=True)
        model.zipmoe_engine = engine
        log.info("zipmoe: %d experts of %s, budget %s: %s", len(entries), format_size(2 * numel),
                 format_size(budget.total), {k: format_size(v) for k, v in budget.breakdown().items()})
        weakref.finalize(model, engine.close)
    except BaseException:
        engine.close()
        raise
    engine.on_close.append(release_frozen)  # last: from here on, closing the engine releases the freeze
    return model


class _Stages:
    """Reports loading stages to a progress(stage, done, total) callback (None: silent)."""

    def __init__(self, callback: Callable[[str, int, int], None] | None):
        self.callback, self.done, self.total = callback, 0, 0

    def __call__(self, stage: str) -> None:
        """`stage` starts now; the ones before it are done."""
        if self.callback is not None:
            self.callback(stage, self.done, self.total)
        self.done += 1

    def finish(self) -> None:
        if self.callback is not None:
            self.callback("ready", self.total, self.total)


def _check_expert_shapes(model: torch.nn.Module, shapes: ExpertShapes) -> None:
    """The store's experts must be what the model's experts modules multiply with (a store from another
    checkpoint, or one missing its gates, would otherwise fail inside a matmul)."""
    for _, name, module in compute.experts_modules(model):
        want = (tuple(getattr(module, compute.in_proj(module)).shape[1:]), tuple(module.down_proj.shape[1:]))
        if want != (shapes.gate_up, shapes.down):
            raise ZipMoEError(f"the store's experts are {shapes.gate_up} and {shapes.down}, but {name} takes "
                              f"{want[0]} and {want[1]}: the store was converted from another checkpoint")


def _top_k(config: dict) -> int:
    for name in ("num_experts_per_tok", "moe_top_k", "top_k"):
        if isinstance(config.get(name), int):
            return config[name]
    return 2


def unload(model: torch.nn.Module) -> None:
    """Stop the model's engine now: joins its threads, frees its pools, closes the store."""
    engine = getattr(model, "zipmoe_engine", None)
    if engine is None:
        raise ZipMoEError("this model was not loaded by zipmoe.load")
    engine.close()

