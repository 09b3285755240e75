"""The engine: serves one model's routed experts from a store under a memory budget.

Arrow: models/compute (a MoE layer asks for its needed experts) → Engine.experts → cache lookup →
schedule → executor (I/O threads + W decode workers fill buffers) → weights yielded as each is
ready → cache.commit. Implements models.base.ExpertSource.
Threads: `experts()` runs on the compute thread (the caller of model.forward); `LayerOps` methods
run on the executor's I/O threads and decode workers and only write into buffers handed to them.
N=weights of one expert, K=exponent shards, W=decode workers; sizes in bytes, times in seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from zipmoe.cache import ExpertCache
from zipmoe.cache.staging import staging_nbytes
from zipmoe.codec.coders.base import ExponentCoder
from zipmoe.engine.gil import restore_switch_interval, shorten_switch_interval
from zipmoe.engine.late_merge import TorchMerge, TritonMerge, merge_class
from zipmoe.engine.metrics import EngineStats, log
from zipmoe.engine.planning import PlannedPools
from zipmoe.engine.prefetch import Prefetcher
from zipmoe.errors import UnsupportedModelError
from zipmoe.scheduler.executor import Executor
from zipmoe.scheduler.schedule import schedule
from zipmoe.scheduler.tasks import CostModel, PlanTimings
from zipmoe.store.format import ExpertEntry
from zipmoe.store.reader import StoreReader
from zipmoe.types import ExpertKey, State

# On a CPU (late_merge off, load's default there) every load decodes fused: each of the K shard jobs decodes its
# exponents and merges them with its slice of the SM plane in one pass (CostModel.task(fused=True): no merge
# step is planned). For E and MISS the plan makes the shards wait for the SM read too (scheduler/model.py),
# which leaves a K-way parallel tail after the last read instead of one worker merging the whole expert (~2.6 ms
# for a Qwen1.5-MoE expert on the device). With late merge (the CUDA default) the shards decode exponents only,
# without waiting for the SM read, and the compute thread merges both planes on the compute device when the
# expert is ready (engine/late_merge.py): the tail after a layer's last read is then a few elementwise kernels.


@dataclass(frozen=True, slots=True)
class ExpertShapes:
    """How one expert's flat BF16 vector splits into its two matmuls' weights: the fused [2I,H] gate_up
    (a non-gated expert's up [I,H]) and down [H,I]."""

    gate_up: tuple[int, int]  # (2I, H), or (I, H) when not gated
    down: tuple[int, int]  # (H, I)

    @property
    def split(self) -> int:
        return self.gate_up[0] * self.gate_up[1]

    @classmethod
    def of(cls, entry: ExpertEntry) -> ExpertShapes:
        return cls.from_projections({t.name: tuple(t.shape) for t in entry.tensors}, str(entry.key))

    @classmethod
    def from_projections(cls, shapes: Mapping[str, tuple[int, ...]], what: str) -> ExpertShapes:
        """From {projection: shape}: gate [I,H], up [I,H], down [H,I], or up and down alone. Anything else (a
        transposed or interleaved layout, say) raises, naming `what`."""
        names = tuple(shapes)
        up, down = shapes.get("up"), shapes.get("down")
        gated = names == ("gate", "up", "down") and shapes["gate"] == up
        if (gated or names == ("up", "down")) and len(up) == len(down) == 2 and tuple(down) == (up[1], up[0]):
            return cls(gate_up=((2 if gated else 1) * up[0], up[1]), down=(down[0], down[1]))
        have = ", ".join(f"{n} {tuple(v)}" for n, v in shapes.items())
        raise UnsupportedModelError(f"{what}: projection shapes {have} are not an MLP zipmoe serves (gate and up "
                                    "[I, H] or up alone, down [H, I]); transposed or interleaved expert layouts "
                                    "(gpt_oss, say) are not supported")


@dataclass(frozen=True, slots=True)
class LayerTrace:
    """One MoE layer call as the engine saw it (Engine.trace): where its time went."""

    layer: int
    entered: float  # time.perf_counter() when the layer asked for its experts
    left: float  # ... when the last expert had been computed (the generator finished)
    f_hits: int  # experts served from F without loading
    runs: tuple[PlanTimings, ...]  # one executor run per wave, in order
    read_bytes: int = 0  # bytes the layer's own reads brought in (prefetched planes not included)
    sync_wait_s: float | None = None  # time the routing's device→host syncs blocked before this call
    forward_entered: float | None = None  # when models/compute's experts forward of this call began
    previous_forward_left: float | None = None  # when the previous call's experts forward returned


class _Load:
    """Buffers and progress of one expert being loaded in the current wave (compute-thread owned)."""

    __slots__ = ("e_buf", "entry", "exp", "keep_e", "keep_sm", "key", "out", "out_u16", "prefetched", "shards",
                 "slot", "sm", "sm_buf", "state", "unverified")

    def __init__(self, key: ExpertKey, state: State, entry: ExpertEntry):
        self.key, self.state, self.entry = key, state, entry
        self.slot = -1  # staging slot index within the wave
        self.prefetched: tuple[np.ndarray, np.ndarray] | None = None  # (SM plane, E region) read ahead
        self.sm: np.ndarray | None = None  # SM plane [N] (cache slot or read buffer)
        self.shards: list[np.ndarray] = []  # K compressed exponent shards
        self.unverified = False  # shards were just read: each is checksummed by the worker that decodes it
        self.keep_sm: np.ndarray | None = None  # cache slots a prefetched expert's planes are copied into,
        self.keep_e: np.ndarray | None = None  # shard by shard on the decode workers (not the compute thread)
        self.sm_buf: np.ndarray | None = None  # where a SM read lands
        self.e_buf: np.ndarray | None = None  # where an E read lands
        self.out_u16: np.ndarray | None = None  # merged BF16 bits [N] on the host
        self.exp: np.ndarray | None = None  # late merge: decoded exponent plane [N] on the host
        self.out: torch.Tensor | None = None  # merged BF16 [N] on the compute device


def _plane_bytes(plane: str, entry: ExpertEntry) -> int:
    return entry.sm.length if plane == "sm" else entry.e_length


class LayerOps:
    """The executor's view of one wave: each method fills one buffer; any thread may call them."""

    def __init__(self, engine: Engine, loads: dict[ExpertKey, _Load]):
        self._engine, self._loads = engine, loads

    def read_sm(self, key: ExpertKey) -> None:
        load = self._loads[key]
        load.sm = self._engine.read_plane("sm", load.entry, load.sm_buf)

    def read_e(self, key: ExpertKey) -> None:
        load = self._loads[key]
        load.shards = self._engine.read_plane("e", load.entry, load.e_buf)
        load.unverified = True

    def read_target(self, key: ExpertKey, sm: bool) -> tuple[int, int, int, int]:
        """(fd, file start, bytes, buffer address) of read_sm's (sm) or read_e's read, for the native channel."""
        load = self._loads[key]
        reader = self._engine.reader
        return (reader.fd, *reader.read_target(load.entry, sm, load.sm_buf if sm else load.e_buf))

    def read_landed(self, key: ExpertKey, sm: bool, seconds: float) -> None:
        """The native channel's read_target read is in: finish it as read_sm / read_e would."""
        load = self._loads[key]
        if sm:
            load.sm = self._engine.plane_landed("sm", load.entry, load.sm_buf, seconds)
        else:
            load.shards = self._engine.plane_landed("e", load.entry, load.e_buf, seconds)
            load.unverified = True

    def decode_shard(self, key: ExpertKey, shard: int) -> None:
        load = self._loads[key]
        lo, hi = load.entry.shard_bounds[shard]
        if load.unverified:  # K checks run on the workers in parallel; the I/O thread only reads
            StoreReader.verify_shard(load.entry, shard, load.shards[shard])
        coder = self._engine.coder
        if load.keep_sm is not None:  # only prefetched loads keep planes this way, and their SM plane is in
            assert load.prefetched is not None, "keep_sm on a load whose SM read may still be running"
            load.keep_sm[lo:hi] = load.sm[lo:hi]
        if load.keep_e is not None:
            at = load.entry.e_shards[shard].offset - load.entry.e_offset
            load.keep_e[at : at + load.shards[shard].size] = load.shards[shard]
        if load.exp is not None:  # late merge: exponents only; the SM plane may still be on its way
            coder.decode_into(load.shards[shard], load.exp[lo:hi])
        else:
            coder.decode_merge_into(load.shards[shard], load.sm[lo:hi], load.out_u16[lo:hi])

    def merge(self, key: ExpertKey) -> None:
        raise AssertionError(f"{key}: a merge step was planned, but loads decode fused or merge late (merge_s = 0)")


class Engine:
    """Routed experts of one store, served to an installed model (see module docstring)."""

    def __init__(
        self, reader: StoreReader, cache: ExpertCache, executor: Executor, coder: ExponentCoder,
        costs: CostModel, device: torch.device, shapes: ExpertShapes, staging_slots: int,
        read_bytes_per_s: float | None = None, pools: PlannedPools | None = None,
        prefetcher: Prefetcher | None = None, late_merge: bool = False,
    ):
        self.reader, self.cache, self.executor, self.coder = reader, cache, executor, coder
        self.costs, self.device, self.shapes = costs, device, shapes
        self.stats = EngineStats()
        self.pools = pools  # planned pool layout + routing statistics; None: the cache's own policy
        self.prefetcher = prefetcher  # reads the next layer's predicted experts; None: no prefetch
        if prefetcher is None:
            self.hint = None  # models/compute skips predicting when the source takes no hints
        self._reads_left = 0  # reads of the current layer not yet done (I/O threads decrement)
        self.read_bytes_per_s = read_bytes_per_s  # optional cap emulating a slower disk
        self._io_free_at = 0.0  # when the capped channel may start its next read
        self._io_lock = threading.Lock()  # the I/O threads' shared counters and cap clock
        self.late_merge = late_merge
        self.staging = cache.staging(staging_slots, exp=late_merge)  # fused loads need no exponent planes
        self._cuda = device.type == "cuda"
        self._merge: TorchMerge | TritonMerge | None = None
        self._exp_rows: list[torch.Tensor] = []  # late merge: torch views of the staging exponent planes
        if late_merge:  # its scratch planes on the compute device
            merge = merge_class(device)
            cache.budget.reserve("staging.late_merge", merge.SCRATCH_PLANES * cache.numel)
            try:
                self._merge = merge(cache.numel, device)
                self._exp_rows = [row[: cache.numel] for row in self.staging.exp.tensors]  # made once, per slot
            except BaseException:
                cache.budget.release("staging.late_merge")
                cache.release_staging(self.staging)
                raise
        # CUDA, fused: workers merge into pinned host BF16, the compute thread copies it to the device.
        # Per slot, made once (no allocation per expert): the pinned row the H2D copy reads, and its
        # uint16 view that the decode workers merge into.
        self._host_rows: tuple[torch.Tensor, ...] = ()
        self._host_u16: list[np.ndarray] = []
        if self._cuda and not late_merge:
            cache.budget.reserve("staging.host_bf16", staging_slots * cache.numel * 2)
            host_out = torch.empty((staging_slots, cache.numel), dtype=torch.int16, pin_memory=True)
            self._host_rows = host_out.unbind(0)
            self._host_u16 = [row.view(np.uint16) for row in host_out.numpy()]
        self._copied = [torch.cuda.Event() for _ in range(staging_slots)] if self._cuda else []
        self._merge_done = torch.cuda.Event() if self._cuda and late_merge else None  # the last late merge's copies
        self._closed = False
        self.resident = False  # set by load(): the model runs its own kernels on the F pool (no hits counted)
        self.on_close: list[Callable[[], None]] = []  # run first by close() (load: drop resident weights)
        self.trace: list[LayerTrace] | None = None  # set to a list to record every layer (benchmarks)
        self.sync_wait_s = 0.0  # added to by models/compute while tracing: time its routing syncs blocked
        self.forward_entered_at: float | None = None  # set by models/compute while tracing (LayerTrace)
        self.forward_left_at: float | None = None
        shorten_switch_interval()  # the loader threads hand results on without waiting 5 ms for the GIL

    @staticmethod
    def staging_bytes(slots: int, numel: int, sm_stride: int, e_stride: int, device: torch.device,
                      late_merge: bool) -> int:
        """Bytes of the budget an engine's staging takes (what __init__ reserves): read buffers and outputs per
        slot, plus exponent planes and the merge's scratch with late_merge, or pinned BF16 rows on CUDA."""
        nbytes = staging_nbytes(slots, numel, sm_stride, e_stride, exp=late_merge)
        if late_merge:
            return nbytes + merge_class(device).SCRATCH_PLANES * numel
        return nbytes + (slots * 2 * numel if device.type == "cuda" else 0)

    @property
    def merge_path(self) -> str:
        """Where experts are recombined, for reports: "workers" (fused decode), "triton" or "torch" (late merge)."""
        if not self.late_merge:
            return "workers"
        return "triton" if isinstance(self._merge, TritonMerge) else "torch"

    # ---- ExpertSource ----

    def experts(self, layer: int, needed: Sequence[int],
                tokens: Sequence[int] | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield (expert, gate_up [2I,H], down [H,I]) for each needed expert as soon as it is ready;
        `tokens` (routed to each) weigh the access for the eviction policy."""
        t_layer = time.perf_counter()
        if self._merge_done is not None:
            # the last layer's late merges copy from host planes this layer may refill: cache slots (its reads and
            # admissions come after this line) and the prefetcher's slot set, which it refills only once a later
            # layer's own reads are done (Prefetcher.disk_free, called from inside experts(), after this line)
            self._merge_done.synchronize()
        keys = [ExpertKey(layer, e) for e in needed]
        if self.pools is not None:
            self.pools.observe(layer, needed)
        prefetched = self._collect(layer, keys)
        with self.cache.acquire(keys, tokens) as lease:
            hits, loads = [], []
            for key, state in zip(keys, lease.states, strict=True):
                self.stats.hits[state.name] += 1
                load = _Load(key, state, self.reader.entries[key])
                if state is not State.F and state is not State.C and key in prefetched:
                    load.prefetched, load.state = prefetched[key], State.C
                (hits if state is State.F else loads).append(load)
            self._count_prefetch(prefetched, loads)
            n = self.staging.n
            waves = [loads[i : i + n] for i in range(0, len(loads), n)]
            if not waves:  # every expert decoded in F (e.g. the budget holds the model): no plan, no threads
                for load in hits:
                    yield load.key.expert, *self._views(self.cache.f_view(load.key))
            else:
                waves[0] = hits + waves[0]  # F hits ride in the first plan: computed while its reads run
            runs = []
            for wave in waves:
                # `with`: an early close of this generator (or an error in the caller's compute) cancels
                # and drains the run before the lease gives the slots back, so no op writes after it.
                with self._start(wave) as run:
                    by_key = {ld.key: ld for ld in wave}
                    for key in run:
                        load = by_key[key]
                        self._finish(load)
                        yield key.expert, *self._views(load.out)
                self.stats.decode_s += run.timings.decode_busy_s
                self.stats.stall_s += run.timings.stall_s
                runs.append(run.timings)
        t_end = time.perf_counter()
        self.stats.layer_s += t_end - t_layer
        self.stats.layers += 1
        if self.trace is not None:
            self.trace.append(LayerTrace(layer, t_layer, t_end, len(hits), tuple(runs), _read_bytes(loads),
                                         self.sync_wait_s, self.forward_entered_at, self.forward_left_at))
            self.sync_wait_s = 0.0

    # ---- one wave: claim slots, plan, run ----

    def _start(self, wave: list[_Load]):
        """Bind buffers, plan the wave, and return the executor's run (it starts when iterated)."""
        slot = 0
        for load in wave:
            if load.state is State.F:
                load.out = self.cache.f_view(load.key)
            else:
                self._bind(load, slot)
                slot += 1
        tasks = [
            self.costs.task(ld.key, ld.state, ld.entry.sm.length, ld.entry.e_length, ld.entry.numel,
                            len(ld.entry.e_shards), fused=not self.late_merge, late_merge=self.late_merge)
            for ld in wave
        ]
        plan = schedule(tasks, self.executor.workers, exact_times=False)
        return self.executor.run(plan, LayerOps(self, {ld.key: ld for ld in wave}))

    def _bind(self, load: _Load, slot: int) -> None:
        """Point a load at its buffers: cache slots where the policy keeps a plane, else staging slot."""
        cache, st, key = self.cache, self.staging, load.key
        t = cache.targets(key)
        if load.prefetched is not None:
            self._bind_prefetched(load, t)
        elif load.state in (State.C, State.S):
            load.sm = cache.sm_view(key)
        else:
            load.sm_buf = t.sm if t.sm is not None else st.sm.views[slot]
        if load.prefetched is not None:
            pass
        elif load.state in (State.C, State.E):
            load.shards = self._split_shards(load.entry, cache.e_view(key))
        else:
            load.e_buf = t.e if t.e is not None else st.e.views[slot]
        load.slot = slot
        if self._cuda:
            self._copied[slot].synchronize()  # the previous wave's H2D from this slot's host buffers is done
        if self.late_merge:  # workers write exponents here; the late merge writes the expert into `out`
            load.exp = st.exp.views[slot][: load.entry.numel]  # the workers' numpy view; the merge reads _exp_rows
            load.out = t.full if t.full is not None else st.full.views[slot]
        elif self._cuda:
            load.out_u16 = self._host_u16[slot]
            load.out = t.full if t.full is not None else st.full.views[slot]
        elif t.full is not None:
            load.out_u16, load.out = t.full_u16, t.full
        else:
            load.out_u16, load.out = st.full.u16[slot], st.full.views[slot]

    def _bind_prefetched(self, load: _Load, t) -> None:
        """Decode from the prefetched planes (or the cache's, where it holds one). The slots the admission
        policy handed out get the planes too, so the cache keeps them as if it had read them itself: each
        decode worker copies its shard's slices (K shards; its SM plane is in from the start, so even a late
        merge's shards, which do not wait for SM, can copy it)."""
        cache, key, entry = self.cache, load.key, load.entry
        sm, region = load.prefetched
        held = cache.state(key)
        load.sm = cache.sm_view(key) if held is State.S else sm
        load.shards = self._split_shards(entry, cache.e_view(key) if held is State.E else region)
        load.keep_sm = t.sm
        load.keep_e = t.e

    def _collect(self, layer: int, keys: list[ExpertKey]) -> dict:
        if self.prefetcher is None:
            return {}
        self.prefetcher.layer_started()
        got = self.prefetcher.collect(layer, keys)
        counters = self.prefetcher.counters
        self.stats.prefetch_bytes_read = counters.bytes_read
        return got

    def _count_prefetch(self, prefetched: dict, loads: list[_Load]) -> None:
        """Prediction accounting, and the number of reads after which the disk is free for prefetch."""
        if self.prefetcher is None:  # only the prefetcher needs to know when the layer's reads are done
            return
        reads = sum((ld.state in (State.E, State.MISS)) + (ld.state in (State.S, State.MISS)) for ld in loads)
        self._reads_left = reads
        c = self.prefetcher.counters
        used = sum(ld.prefetched is not None for ld in loads)
        c.used += used
        if prefetched:
            c.missed += sum(ld.state is not State.C for ld in loads)
        if reads == 0:
            self.prefetcher.disk_free()

    def hint(self, layer: int, experts: list[int]) -> None:
        """ExpertSource hint: the next MoE layer will probably need `experts`; read ahead what is not held."""
        keys = [k for e in experts if (k := ExpertKey(layer, e)) in self.reader.entries
                and self.cache.state(k) not in (State.F, State.C)]
        self.prefetcher.hint(layer, keys)

    @staticmethod
    def _split_shards(entry: ExpertEntry, region: np.ndarray) -> list[np.ndarray]:
        base = entry.e_offset
        return [region[c.offset - base : c.offset - base + c.length] for c in entry.e_shards]

    def _finish(self, load: _Load) -> None:
        """Weights are merged: move them to the device (CUDA) and make admitted slots visible."""
        if load.state is State.F:
            return
        if self._merge is not None:
            self._merge(torch.from_numpy(load.sm), self._exp_rows[load.slot], load.out)
            if self._merge_done is not None:  # its H2D copies read host planes: staging (per slot) and cache slots
                self._copied[load.slot].record()
                self._merge_done.record()
        elif self._cuda:
            slot = load.slot
            load.out.view(torch.int16).copy_(self._host_rows[slot], non_blocking=True)
            self._copied[slot].record()
        self.cache.commit(load.key, e_nbytes=load.entry.e_length)

    def _views(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.shapes
        return flat[: s.split].view(s.gate_up), flat[s.split :].view(s.down)

    # ---- I/O (executor's I/O threads) ----

    def read_plane(self, plane: str, entry: ExpertEntry, buf: np.ndarray):
        """One read of an expert's SM plane (checksummed here) or E region (its shards are checked by the
        decode workers), honouring the bandwidth cap. Any I/O thread may call."""
        nbytes = _plane_bytes(plane, entry)
        t0 = time.perf_counter()
        done_at = 0.0
        if self.read_bytes_per_s:  # the capped channel serves reads one after another at the cap, in the
            with self._io_lock:     # order the I/O threads took them (the slot is booked before reading)
                start = max(t0, self._io_free_at)
                self._io_free_at = done_at = start + nbytes / self.read_bytes_per_s
        if plane == "sm":
            out = self.reader.read_sm_into(entry, buf)
        else:
            out = self.reader.read_e_into(entry, buf, verify=False)
        delay = done_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        self._count_read(plane, nbytes, time.perf_counter() - t0)
        return out

    def plane_landed(self, plane: str, entry: ExpertEntry, buf: np.ndarray, seconds: float):
        """What read_plane returns, for a read the native channel made into buf (reader.read_target) in
        `seconds`: the SM plane checksummed here, or the E shards' views; counted as read_plane counts."""
        out = self.reader.landed_sm(entry, buf) if plane == "sm" else self.reader.landed_e(entry, buf)
        self._count_read(plane, _plane_bytes(plane, entry), seconds)
        return out

    def _count_read(self, plane: str, nbytes: int, seconds: float) -> None:
        with self._io_lock:
            self.stats.io_busy_s += seconds
            self.stats.bytes_read += nbytes
            if plane == "sm":
                self.stats.sm_bytes_read += nbytes
            else:
                self.stats.e_bytes_read += nbytes
            self._reads_left -= 1
            free = self._reads_left == 0
        if free and self.prefetcher is not None:
            self.prefetcher.disk_free()

    def resident_weights(self, layer: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """All of a layer's experts as the fused [E,2I,H] and [E,H,I] tensors transformers uses, as views of
        the F pool, when every expert is held decoded there for good (the budget holds the whole model and
        preload() laid them out in order); else None. Lets the model run its own kernels on them."""
        if self.cache.capacity[State.F] < len(self.reader.entries):
            return None  # F could evict: the views would not stay valid
        keys = [ExpertKey(layer, e) for e in range(num_experts)]
        if any(k not in self.reader.entries for k in keys):
            return None
        block = self.cache.f_block(keys)
        if block is None:
            return None
        s = self.shapes
        return block[:, : s.split].view(num_experts, *s.gate_up), block[:, s.split :].view(num_experts, *s.down)

    def preload(self) -> None:
        """Load every expert through the normal path, layer by layer, so that when the budget holds them
        all the first tokens do not pay for the reads; the statistics start afresh afterwards."""
        layers: dict[int, list[int]] = {}
        for key in sorted(self.reader.entries):
            layers.setdefault(key.layer, []).append(key.expert)
        t0, read0 = time.perf_counter(), self.stats.bytes_read
        pools, self.pools = self.pools, None  # a preload is not routing: keep it out of the statistics
        try:
            for layer, experts in layers.items():
                for _ in self.experts(layer, experts):
                    pass
        finally:
            self.pools = pools
        log.info("zipmoe: preloaded %d experts (%.2f GB read) in %.1f s", len(self.reader.entries),
                 (self.stats.bytes_read - read0) / 1e9, time.perf_counter() - t0)
        self.stats = EngineStats()

    def warmup(self) -> None:
        """Compile the decode kernels and touch the staging buffers before the first request.

        numba compiles lazily; without this the first layer of the first request pays the JIT
        (seconds) while every worker waits on it. Decodes one real expert into staging slot 0.
        """
        entry = next(iter(self.reader.entries.values()))
        load = _Load(entry.key, State.MISS, entry)
        st = self.staging
        load.sm = self.reader.read_sm_into(entry, st.sm.views[0])
        load.shards = self.reader.read_e_into(entry, st.e.views[0])
        if self.late_merge:
            load.exp = st.exp.views[0][: entry.numel]
        else:
            load.out_u16 = self._host_u16[0] if self._cuda else st.full.u16[0]
        ops = LayerOps(self, {entry.key: load})
        for shard in range(len(entry.e_shards)):
            ops.decode_shard(entry.key, shard)

    def close(self) -> None:
        """Join threads and give back every buffer and file; the model cannot run afterwards."""
        if self._closed:
            return
        self._closed = True
        failed: BaseException | None = None
        for hook in self.on_close:  # every hook runs, and the rest of close too, whatever one raises
            try:
                hook()
            except BaseException as exc:
                failed = failed or exc
        restore_switch_interval()
        self.executor.close()
        if self.prefetcher is not None:
            self.prefetcher.close()
        if self.pools is not None:
            self.pools.close()
        if self._cuda:
            torch.cuda.synchronize(self.device)
        if self._cuda and not self.late_merge:
            self._host_rows, self._host_u16 = (), []  # the pinned staging goes with its last view
            self.cache.budget.release("staging.host_bf16")
        if self._merge is not None:
            self._merge, self._exp_rows = None, []
            self.cache.budget.release("staging.late_merge")
        self.cache.release_staging(self.staging)
        self.cache.close()
        self.reader.close()
        if failed is not None:
            raise failed


def _read_bytes(loads: list[_Load]) -> int:
    """Bytes the loads' reads brought in: SM planes of E/miss loads, E regions of S/miss loads (trace only)."""
    return sum(ld.entry.sm.length * (ld.state in (State.E, State.MISS))
               + ld.entry.e_length * (ld.state in (State.S, State.MISS)) for ld in loads)
