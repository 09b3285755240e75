"""Profiled cost model: this machine's disk, decode and merge rates on this store, cached per machine.

Arrow: store dir (+ the engine's compute-time probe) ──profile_machine()──▶ MachineProfile ──▶
scheduler CostModel (task times) and the capacity planner. Load time, engine thread, before any
worker starts. Measures on the store's own experts.bin and coder: O_DIRECT read latency (4 KiB reads)
and bandwidth (SM planes at random offsets), single-worker decode rate (real shards), merge rate.
At most ~4 s; skipped when ~/.cache/zipmoe/profile-<host>.json has a fresh entry for this store path,
store contents (fingerprint) and device. Expert compute time comes from a callable the engine supplies
(the planner never imports torch).

# sizes in bytes, rates in B/s, times in s
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zipmoe.codec.coders import get_coder
from zipmoe.codec.merge import merge_into
from zipmoe.errors import ZipMoEError
from zipmoe.planner.makespan import ExpertGeometry
from zipmoe.planner.profile_io import store_fingerprint
from zipmoe.scheduler.tasks import CostModel
from zipmoe.store.aligned import ALIGN, StripedReads, aligned_buffer, open_direct, read_direct_into
from zipmoe.store.format import DATA_NAME, ExpertEntry
from zipmoe.store.reader import StoreReader

log = logging.getLogger(__name__)

PROFILE_VERSION = 2  # bump when what is measured changes; other versions are re-measured (2: striped reads)
MAX_AGE_S = 7 * 86400.0  # a cached profile older than this is measured again
_PHASE_S = {"latency": 0.25, "bandwidth": 1.5, "decode": 1.2, "merge": 0.4}  # time caps per phase
_BW_BYTES = 512 << 20  # stop the bandwidth phase after this many bytes


@dataclass(frozen=True, slots=True)
class MachineProfile:
    """Measured rates of one machine on one store; becomes the scheduler's CostModel."""

    host: str  # hostname it was measured on
    device: str  # compute device label ("cpu", "cuda:0", ...)
    store: str  # resolved store path
    fingerprint: str  # store contents it was measured on (profile_io.store_fingerprint)
    measured_at: float  # unix time of the measurement
    direct_io: bool  # reads bypassed the page cache (False: buffered fallback, bandwidth is optimistic)
    disk_bytes_per_s: float  # sustained read bandwidth, B/s
    disk_latency_s: float  # s per read request (median 4 KiB read)
    decode_bytes_per_s: float  # exponent bytes (= weights) one worker decodes per s
    merge_bytes_per_s: float  # BF16 bytes one merge produces per s
    compute_s: float  # s of compute per expert (from the engine's probe; 0 if none was given)
    probe_s: float  # s the measurement took

    def cost_model(self) -> CostModel:
        """The scheduler's CostModel with these rates."""
        return CostModel(self.disk_bytes_per_s, self.disk_latency_s, self.decode_bytes_per_s,
                         self.merge_bytes_per_s, self.compute_s)

    def describe(self) -> str:
        """One log line with every rate."""
        how = "O_DIRECT" if self.direct_io else "buffered (page cache: optimistic)"
        return (f"cost model on {self.host}/{self.device}: disk {self.disk_bytes_per_s / 1e9:.2f} GB/s {how}, "
                f"latency {self.disk_latency_s * 1e6:.0f} us, decode {self.decode_bytes_per_s / 1e9:.2f} GB/s "
                f"per worker, merge {self.merge_bytes_per_s / 1e9:.2f} GB/s, compute "
                f"{self.compute_s * 1e3:.3f} ms/expert (measured in {self.probe_s:.2f} s)")


def store_geometry(reader: StoreReader) -> ExpertGeometry:
    """ExpertGeometry of a store's split experts, with entry sizes as ExpertCache counts them."""
    split = [e for e in reader.entries.values() if e.mode == "split"]
    if not split or len({e.numel for e in split}) != 1:
        raise ZipMoEError(f"store {reader.path}: planning needs split experts that all have one shape")
    return ExpertGeometry.of(split[0].numel, max(e.sm.length for e in split),
                             round(sum(e.e_length for e in split) / len(split)), reader.manifest.k,
                             e_slot_bytes=reader.max_e_region_bytes)


def cache_path() -> Path:
    """~/.cache/zipmoe/profile-<hostname>.json ($ZIPMOE_CACHE_DIR or $XDG_CACHE_HOME respected)."""
    root = os.environ.get("ZIPMOE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "zipmoe")
    return Path(root) / f"profile-{socket.gethostname()}.json"


def profile_machine(
    store: str | os.PathLike, device: str = "cpu", *, compute_s: Callable[[], float] | float | None = None,
    cache: str | os.PathLike | None = None, max_age_s: float = MAX_AGE_S, force: bool = False,
    read_stripes: int = 1,
) -> MachineProfile:
    """This machine's rates on `store`: the cached entry when fresh, else measured (≤ ~4 s) and cached.

    compute_s: seconds of compute per expert, or a callable the engine supplies that measures it on
    the device (called only when measuring); a number always overrides the cached value. read_stripes: as
    the engine reads (StoreReader(read_stripes)), so the disk rate is the one its channel gets.
    """
    path = Path(cache) if cache is not None else cache_path()
    root, fp = str(Path(store).resolve()), store_fingerprint(store)
    key = f"{root}|{device}|stripes={read_stripes}"
    entries = _read_cache(path)
    hit = None if force else _fresh(entries.get(key), fp, max_age_s)
    if hit is None:
        probe = compute_s if callable(compute_s) else None
        hit = measure(store, device, probe, read_stripes=read_stripes)
        entries[key] = {"version": PROFILE_VERSION, **dataclasses.asdict(hit)}
        _write_cache(path, entries)
        log.info("%s", hit.describe())
    else:
        log.debug("using cached %s", hit.describe())
    if isinstance(compute_s, int | float) and not isinstance(compute_s, bool):
        hit = dataclasses.replace(hit, compute_s=float(compute_s))
    return hit


def _fresh(entry: Any, fingerprint: str, max_age_s: float) -> MachineProfile | None:
    if not isinstance(entry, dict) or entry.get("version") != PROFILE_VERSION:
        return None
    try:
        prof = MachineProfile(**{k: v for k, v in entry.items() if k != "version"})
        prof.cost_model()  # rates must be valid
    except (TypeError, ZipMoEError):
        return None
    if prof.fingerprint != fingerprint or not 0 <= time.time() - prof.measured_at <= max_age_s:
        return None
    return prof


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable machine profile cache %s (%s); measuring again", path, exc)
        return {}
    return doc if isinstance(doc, dict) else {}


def _write_cache(path: Path, entries: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:
        log.warning("could not cache the machine profile in %s (%s); the next load measures again", path, exc)
        tmp.unlink(missing_ok=True)


def measure(store: str | os.PathLike, device: str = "cpu", compute_probe: Callable[[], float] | None = None,
            read_stripes: int = 1) -> MachineProfile:
    """Measure every rate now (no cache); see the module docstring."""
    t0 = time.perf_counter()
    with StoreReader(store) as reader:
        split = [e for e in reader.entries.values() if e.mode == "split"]
        if not split:
            raise ZipMoEError(f"store {os.fspath(store)} has no split (BF16) experts to profile")
        rng = np.random.default_rng(0)
        sample = [split[i] for i in rng.permutation(len(split))]
        fd, direct = open_direct(reader.path / DATA_NAME)  # our own fd: the reader's is its business
        try:
            latency = _latency(fd, rng)
            bandwidth = _bandwidth(fd, sample, reader.max_sm_bytes, latency, read_stripes)
        finally:
            os.close(fd)
        decode, merge = _decode_and_merge(reader, sample)
    compute = float(compute_probe()) if compute_probe is not None else 0.0
    if compute_probe is None:
        log.info("no compute probe given: the cost model assumes 0 s of compute per expert")
    return MachineProfile(socket.gethostname(), device, str(Path(store).resolve()), store_fingerprint(store),
                          time.time(), direct, bandwidth, latency, decode, merge, max(0.0, compute),
                          time.perf_counter() - t0)


def _latency(fd: int, rng: np.random.Generator) -> float:
    """Median time of single 4 KiB reads at random aligned offsets."""
    pages = max(1, os.fstat(fd).st_size // ALIGN)
    buf, times = aligned_buffer(ALIGN), []
    deadline = time.perf_counter() + _PHASE_S["latency"]
    while len(times) < 64 and (len(times) < 8 or time.perf_counter() < deadline):
        off = int(rng.integers(pages)) * ALIGN
        t = time.perf_counter()
        os.preadv(fd, [memoryview(buf)], off)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _bandwidth(fd: int, sample: list[ExpertEntry], max_sm_bytes: int, latency: float, stripes: int = 1) -> float:
    """Bytes per s of whole SM-plane reads one after another, each split in `stripes` parts as the engine
    reads them, the per-request latency taken out."""
    buf = aligned_buffer(max_sm_bytes + 2 * ALIGN)
    striped = StripedReads(stripes) if stripes > 1 else None
    read = striped.read_into if striped is not None else read_direct_into
    done = reads = 0
    spent = 0.0
    try:
        for entry in sample * max(1, -(-4 // len(sample))):  # at least 4 reads even on a tiny store
            t = time.perf_counter()
            read(fd, entry.sm.offset, entry.sm.length, buf)
            spent += time.perf_counter() - t
            done, reads = done + entry.sm.length, reads + 1
            if (spent > _PHASE_S["bandwidth"] or done > _BW_BYTES) and reads >= 4:
                break
    finally:
        if striped is not None:
            striped.close()
    return done / max(spent - reads * latency, 0.5 * spent, 1e-9)


def _decode_and_merge(reader: StoreReader, sample: list[ExpertEntry]) -> tuple[float, float]:
    """Single-thread decode rate (exponent bytes/s) over real shards, and merge rate (BF16 bytes/s)."""
    coder = get_coder(reader.manifest.codec_id, **reader.manifest.codec_params)
    e_buf, sm_buf = aligned_buffer(reader.max_e_region_bytes), aligned_buffer(reader.max_sm_bytes)
    first = sample[0]
    exp, out = np.empty(first.numel, np.uint8), np.empty(first.numel, np.uint16)
    _decode(coder, reader.read_e_into(first, e_buf), first, exp)  # warm-up (JIT, caches)
    decoded, spent, i = 0, 0.0, 0
    while spent < _PHASE_S["decode"] and (i < len(sample) or i < 3):
        entry = sample[i % len(sample)]
        shards = reader.read_e_into(entry, e_buf)
        exp = exp if exp.size == entry.numel else np.empty(entry.numel, np.uint8)
        t = time.perf_counter()
        _decode(coder, shards, entry, exp)
        spent, decoded, i = spent + time.perf_counter() - t, decoded + entry.numel, i + 1
    sm = reader.read_sm_into(first, sm_buf)
    _decode(coder, reader.read_e_into(first, e_buf), first, exp := np.empty(first.numel, np.uint8))
    merge_into(sm, exp, out)  # warm-up
    merged, m_spent = 0, 0.0
    while m_spent < _PHASE_S["merge"] and merged < 64 * out.nbytes:
        t = time.perf_counter()
        merge_into(sm, exp, out)
        m_spent, merged = m_spent + time.perf_counter() - t, merged + out.nbytes
    return decoded / max(spent, 1e-9), merged / max(m_spent, 1e-9)


def _decode(coder: Any, shards: list[np.ndarray], entry: ExpertEntry, exp: np.ndarray) -> None:
    for (lo, hi), payload in zip(entry.shard_bounds, shards, strict=True):
        coder.decode_into(payload, exp[lo:hi])
