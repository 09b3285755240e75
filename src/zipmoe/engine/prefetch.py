"""Cross-layer prefetch: read the planes of experts the next MoE layer will probably need while the
disk would otherwise idle (the current layer's decode tail, merge, copies and compute).

Arrow: models/compute hints (next layer, predicted experts) → Prefetcher threads read their SM plane
and E region (checksummed) into its own slots → the engine collects them at the next layer and
decodes them like C-state experts. Predictions never change outputs: a prefetched plane is the same
verified bytes a normal read would bring. Threads: READ_THREADS "zipmoe-prefetch-i" threads read, one
expert each at a time; the compute thread hints, collects and marks the layer's own reads done. Two,
because a read thread that returns from its syscall while the compute thread runs Python waits for the
GIL before it can start the next part: with one thread the disk idles for that wait after every part
(scripts/gil_reads.py measures it; BENCHMARKS.md, tenth session).
A misprediction costs at most one part (READ_PART) of each read in flight when the next layer starts:
the layer waits for those reads only if it needs their experts, else they stop at their next part
boundary, so they do not share the disk with the layer's own reads for long; queued reads are dropped.
Every byte the threads read is counted, kept or not. With native=True (load(native_reads=True)) a read thread
reads each plane in one native call (store/native_reads.stoppable_reader) that goes from part to part without
the GIL and stops on its flight's flag, which the compute thread sets where it calls the read off.
Slots come in two sets used by alternate hints, so a set being decoded by layer l+1 is never overwritten by the
reads for layer l+2. Sizes in bytes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Container, Sequence
from dataclasses import dataclass, field

import numpy as np

from zipmoe.cache.slabs import HostSlab
from zipmoe.store import native_reads
from zipmoe.store.aligned import ReadStopped
from zipmoe.store.format import ExpertEntry
from zipmoe.store.reader import StoreReader
from zipmoe.types import ExpertKey

# Bytes per read call of a prefetch read (a multiple of 4096): the most disk time a read called off still
# takes. scripts/disk_probe.py on the device (BENCHMARKS.md, fifth session): one O_DIRECT stream reads
# 4 MiB at 2.10 GB/s, 8 MiB at 2.16.
READ_PART = 4 << 20
READ_THREADS = 2


@dataclass(eq=False)
class _Flight:
    """One read in flight: its expert, slot, the fill of the slot set it was queued under, and whether it
    was called off (its layer started without needing it). flag[0] != 0 tells a native read to stop."""

    key: ExpertKey
    slot: int
    fill: int
    drop: bool = False
    flag: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))


@dataclass
class PrefetchCounters:
    hinted: int = 0  # experts predicted for a next layer (after dropping those already held)
    read: int = 0  # of those, read before the layer came
    used: int = 0  # read and then needed by that layer (correct predictions that saved a read)
    missed: int = 0  # needed loads of hinted layers that no prefetch covered
    bytes_read: int = 0  # every byte the read threads read, kept or not (in the engine's bytes read)
    discarded: int = 0  # reads (finished or called off) whose planes were not kept
    wasted_bytes: int = 0  # the bytes of those

    def snapshot(self) -> dict:
        covered = self.used + self.missed
        return {**self.__dict__, "precision": self.used / self.read if self.read else 0.0,
                "coverage": self.used / covered if covered else 0.0}


class Prefetcher:
    """See the module docstring. `slots` experts per set; two sets; pinned host memory on CUDA; `threads`
    read threads (default READ_THREADS, read at call time so a benchmark can A/B it); native: read in native
    code (compiled here, so a failure shows at load)."""

    def __init__(self, reader: StoreReader, slots: int, sm_stride: int, e_stride: int, pinned: bool,
                 part: int = READ_PART, threads: int | None = None, native: bool = False):
        n_threads = READ_THREADS if threads is None else threads
        if n_threads < 1:
            raise ValueError(f"a prefetcher needs at least one read thread, got threads={threads}")
        self._read_parts = native_reads.stoppable_reader() if native else None
        self.reader, self.slots, self.part = reader, slots, part
        self._sm = HostSlab(2 * slots, sm_stride, pinned=pinned)
        self._e = HostSlab(2 * slots, e_stride, pinned=pinned)
        self.counters = PrefetchCounters()
        self._cv = threading.Condition()
        self._jobs: list[tuple[int, ExpertEntry, int]] = []  # (layer, entry, slot) not yet started
        self._done: dict[ExpertKey, tuple[np.ndarray, list[np.ndarray], int]] = {}  # read, not collected
        self._flights: list[_Flight] = []  # reads in flight, one per busy thread
        self._disk_free = True  # the current layer's own reads are done
        self._set = 0
        self._fill = [0, 0]  # per set, bumped when a hint refills it: a read from an older fill is dropped
        self._stop = False
        self.read_spans: list[tuple[float, float, int]] | None = None  # (start, end, bytes) of each read, if set
        self._threads = [threading.Thread(target=self._loop, name=f"zipmoe-prefetch-{i}", daemon=True)
                         for i in range(n_threads)]
        for t in self._threads:
            t.start()

    @staticmethod
    def nbytes(slots: int, sm_stride: int, e_stride: int) -> int:
        return 2 * slots * (sm_stride + e_stride)

    # ---- compute thread ----

    def hint(self, layer: int, keys: Sequence[ExpertKey]) -> None:
        """Queue reads for `keys` of `layer` (replacing older queued hints); held experts were dropped."""
        keys = list(keys)[: self.slots]
        with self._cv:
            self._set ^= 1
            self._fill[self._set] += 1
            self._disk_free = False  # the hinting layer's own reads come first
            base = self._set * self.slots
            # planes still uncollected in the set about to be refilled are dropped, never served stale
            self._done = {k: v for k, v in self._done.items() if v[2] // self.slots != self._set}
            self._jobs = [(layer, self.reader.entries[k], base + i) for i, k in enumerate(keys)]
            self.counters.hinted += len(keys)
            self._flag_unwanted()
            self._cv.notify_all()

    def layer_started(self) -> None:
        """The compute thread's layer is about to read: keep the disk for it."""
        with self._cv:
            self._disk_free = False

    def disk_free(self) -> None:
        """The current layer's own reads are done: prefetch may use the disk."""
        with self._cv:
            self._disk_free = True
            self._cv.notify_all()

    def collect(self, layer: int, needed: Container[ExpertKey]) -> dict[ExpertKey, tuple[np.ndarray, list[np.ndarray]]]:
        """(SM plane, E region) prefetched for `layer`; its queued reads are dropped; a read in flight is
        awaited if `needed` has its expert (it is further along than a new read), else called off (it
        stops at its next part and is discarded), so a wrong guess never delays the layer."""
        with self._cv:
            self._jobs = [j for j in self._jobs if j[0] != layer]
            for f in self._flights:
                f.drop = f.drop or f.key not in needed
            self._flag_unwanted()
            while any(not f.drop for f in self._flights):
                self._cv.wait()
            got = {k: v[:2] for k, v in self._done.items() if k.layer == layer}
            self._done = {k: v for k, v in self._done.items() if k.layer != layer}
        return got

    def wait_idle(self, timeout_s: float, layer: int | None = None) -> bool:
        """Block until no read (for `layer`, or any) is queued or in flight; False if timeout_s passes first.
        For tests that need every hinted read done before its layer, so what a run prefetches does not
        depend on thread timing. Reads wait for disk_free(): do not wait for reads that must follow the
        current layer's own."""
        def idle() -> bool:
            busy = any(layer is None or f.key.layer == layer for f in self._flights)
            return self._stop or not (busy or any(layer is None or j[0] == layer for j in self._jobs))

        with self._cv:
            return self._cv.wait_for(idle, timeout_s)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._flag_unwanted()
            self._cv.notify_all()
        for t in self._threads:
            t.join()
        self._sm.close()
        self._e.close()

    # ---- read threads ----

    def _next_job(self) -> int | None:
        """Index of the first queued job whose slot no read in flight is writing, or None (caller holds the
        lock). A called-off read may still be writing its slot after a later hint reused that slot for another
        expert: starting that job before the old read has stopped would let the old bytes land over planes
        already checked (one read thread could never overlap itself this way)."""
        busy = {f.slot for f in self._flights}
        return next((i for i, job in enumerate(self._jobs) if job[2] not in busy), None)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and (not self._disk_free or (i := self._next_job()) is None):
                    self._cv.wait()
                if self._stop:
                    return
                _layer, entry, slot = self._jobs.pop(i)
                flight = _Flight(entry.key, slot, self._fill[slot // self.slots])
                self._flights.append(flight)
            t0 = time.perf_counter()
            sm, nbytes = self._read(entry, flight)
            spans = self.read_spans  # one read of the attribute: the bench may reset it meanwhile
            if spans is not None:
                spans.append((t0, time.perf_counter(), nbytes))
            with self._cv:
                self._flights.remove(flight)
                self.counters.bytes_read += nbytes
                if sm is not None and not self._unwanted(flight):
                    self._done[entry.key] = (sm, self._e.views[slot][: entry.e_length], slot)  # E: 4 KiB-aligned
                    self.counters.read += 1
                else:
                    self.counters.discarded += 1
                    self.counters.wasted_bytes += nbytes
                self._cv.notify_all()

    def _flag_unwanted(self) -> None:
        """Raise the flag of every flight now unwanted, for native reads (caller holds the lock)."""
        for f in self._flights:
            if self._unwanted(f):
                f.flag[0] = 1

    def _unwanted(self, flight: _Flight) -> bool:
        """The read was called off: its layer started without it, its slot set was refilled since, or the
        prefetcher is closing. Read without the lock between two parts (single attribute reads)."""
        return flight.drop or self._stop or flight.fill != self._fill[flight.slot // self.slots]

    def _read(self, entry: ExpertEntry, flight: _Flight) -> tuple[np.ndarray | None, int]:
        """(SM plane or None, bytes the disk delivered) of one expert's SM + E read into its slot, in parts that
        stop once the read is unwanted. None also for a bad chunk: the normal read path reports it when the
        expert is needed."""
        if self._read_parts is not None:
            return self._read_native(entry, flight)

        def stop() -> bool:
            return self._unwanted(flight)

        done = 0  # bytes of the planes read whole
        try:
            sm = self.reader.read_sm_into(entry, self._sm.views[flight.slot], part=self.part, stop=stop)
            done = entry.sm.length
            self.reader.read_e_into(entry, self._e.views[flight.slot], part=self.part, stop=stop)
            return sm, done + entry.e_length
        except ReadStopped as exc:
            return None, done + exc.bytes_read
        except Exception:  # read whole, then failed its checksum
            return None, done + (entry.e_length if done else entry.sm.length)

    def _read_native(self, entry: ExpertEntry, flight: _Flight) -> tuple[np.ndarray | None, int]:
        """_read in native code: each plane's aligned read in parts without the GIL, stopping on flight.flag.
        Bytes are counted as _read counts them for a read that completes, stops or fails its check; a short or
        failed pread counts what it delivered. Any failure gives None, as there."""
        done, sm = 0, None
        try:
            for is_sm, buf in ((True, self._sm.views[flight.slot]), (False, self._e.views[flight.slot])):
                if not is_sm and not entry.e_shards:
                    break
                start, span, address = self.reader.read_target(entry, is_sm, buf)
                got, status = self._read_parts(self.reader.fd, start, span, address, self.part, flight.flag)
                if status != native_reads.COMPLETE:
                    return None, done + got
                done += entry.sm.length if is_sm else entry.e_length
                # checked like read_sm_into / read_e_into(verify=True): the engine decodes these as verified
                if is_sm:
                    sm = self.reader.landed_sm(entry, buf)
                else:
                    self.reader.landed_e(entry, buf, verify=True)
        except Exception:  # a bad chunk, or the store closing: the normal read path reports it when needed
            return None, done
        return sm, done
