"""inspect / verify: diagnostics over a finished store (library side of `zipmoe inspect` and `zipmoe verify`).

In: a store directory (and, for verify --against, the original HF checkpoint). Out: a JSON-able
report dict (inspect) or a VerifyReport (verify); a mismatch raises VerificationError naming the tensor.
Both decode every expert on W pool threads (each with its own page-aligned buffers); results are
consumed in sorted expert order, so "the first mismatch" is deterministic.
L=layers W=workers H=order-0 exponent entropy in bits/weight; sizes in bytes; ratios stored/BF16.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import xxhash

from zipmoe.codec import get_coder
from zipmoe.codec.coders.base import ExponentCoder
from zipmoe.errors import VerificationError
from zipmoe.store.format import DATA_NAME, DTYPE_SIZES, ExpertEntry
from zipmoe.store.reader import StoreReader

T = TypeVar("T")


def available_cores() -> int:
    """CPU cores this process may run on (affinity / container cpusets), the default worker count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


MismatchError = VerificationError  # the old name, kept for callers written before errors.py held it


class _Decoder:
    """Decodes experts of one store; buffers are per thread, coders shared (they are stateless)."""

    def __init__(self, reader: StoreReader):
        self.reader = reader
        m = reader.manifest
        self._coders: dict[str, ExponentCoder] = {m.codec_id: get_coder(m.codec_id, **dict(m.codec_params))}
        self._local = threading.local()

    def coder(self, codec: str) -> ExponentCoder:
        """The coder a chunk names (shards may fall back to 'raw')."""
        if codec not in self._coders:
            self._coders[codec] = get_coder(codec)
        return self._coders[codec]

    def _buffers(self) -> tuple[np.ndarray, np.ndarray]:
        if not hasattr(self._local, "sm"):
            self._local.sm, self._local.e = self.reader.new_sm_buffer(), self.reader.new_e_buffer()
        return self._local.sm, self._local.e

    def exponents(self, entry: ExpertEntry) -> np.ndarray:
        """The expert's exponent plane u8[n] (E shards read, checksum-verified, decoded)."""
        _, ebuf = self._buffers()
        exp = np.empty(entry.numel, np.uint8)
        payloads = self.reader.read_e_into(entry, ebuf)
        for (a, b), chunk, payload in zip(entry.shard_bounds, entry.e_shards, payloads, strict=True):
            self.coder(chunk.codec).decode_into(payload, exp[a:b])
        return exp

    def weights(self, entry: ExpertEntry) -> np.ndarray:
        """The expert's flat original bits: u16[n] for split (BF16) experts, u8 bytes for raw ones."""
        smbuf, ebuf = self._buffers()
        sm = self.reader.read_sm_into(entry, smbuf)
        if entry.mode == "raw":
            return sm.copy()
        out = np.empty(entry.numel, np.uint16)
        payloads = self.reader.read_e_into(entry, ebuf)
        for (a, b), chunk, payload in zip(entry.shard_bounds, entry.e_shards, payloads, strict=True):
            self.coder(chunk.codec).decode_merge_into(payload, sm[a:b], out[a:b])
        return out


def _ordered_map(fn: Callable[[ExpertEntry], T], entries: Sequence[ExpertEntry], workers: int | None,
                 bar: Any) -> Iterator[tuple[ExpertEntry, T]]:
    """fn over entries on W threads, yielded in entry order; at most 2W results held at once."""
    workers = max(1, workers or available_cores())
    with ThreadPoolExecutor(workers, thread_name_prefix="zipmoe-report") as pool:
        for start in range(0, len(entries), 2 * workers):
            batch = entries[start : start + 2 * workers]
            for entry, result in zip(batch, pool.map(fn, batch), strict=True):
                bar.update(_original_bytes(entry))
                yield entry, result


def _original_bytes(entry: ExpertEntry) -> int:
    return entry.numel * DTYPE_SIZES[entry.tensors[0].dtype]


def _bar(progress: bool, total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                dynamic_ncols=True)


# ---------------------------------------------------------------- inspect
@dataclass
class _Row:
    """Accumulated statistics of a group of BF16 tensors (a projection, a layer, or everything)."""

    numel: int = 0  # weights
    sm_bytes: int = 0  # SM plane bytes (1 per weight)
    e_bytes: float = 0.0  # coded exponent bytes, shards apportioned to tensors by element overlap
    hist: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))  # exponent histogram

    def add(self, other: _Row) -> None:
        self.numel += other.numel
        self.sm_bytes += other.sm_bytes
        self.e_bytes += other.e_bytes
        self.hist += other.hist

    def to_json(self) -> dict[str, Any]:
        h = exponent_entropy_from_hist(self.hist)
        bf16, stored = 2 * self.numel, self.sm_bytes + round(self.e_bytes)
        ratio = stored / bf16 if bf16 else 0.0
        floor = (8 + h) / 16
        return {"numel": self.numel, "bf16_bytes": bf16, "stored_bytes": stored, "sm_bytes": self.sm_bytes,
                "e_bytes": round(self.e_bytes), "entropy_bits": h, "ratio": ratio, "floor_ratio": floor,
                "ratio_vs_floor": ratio / floor if floor else 0.0}


def exponent_entropy_from_hist(hist: np.ndarray) -> float:
    """Order-0 entropy (bits/symbol) of a 256-bin exponent histogram."""
    total = hist.sum()
    if total == 0:
        return 0.0
    p = hist[hist > 0] / total
    return float(-(p * np.log2(p)).sum() + 0.0)


def _expert_rows(decoder: _Decoder, entry: ExpertEntry) -> list[tuple[str, _Row]]:
    """(projection, stats) per tensor of one split expert."""
    exp = decoder.exponents(entry)
    rows = []
    for t in entry.tensors:
        row = _Row(numel=t.numel, sm_bytes=t.numel)
        row.hist += np.bincount(exp[t.offset : t.offset + t.numel], minlength=256)
        for (a, b), chunk in zip(entry.shard_bounds, entry.e_shards, strict=True):
            overlap = min(b, t.offset + t.numel) - max(a, t.offset)
            if overlap > 0:
                row.e_bytes += chunk.length * overlap / (b - a)
        rows.append((t.name, row))
    return rows


def inspect_store(path: str | os.PathLike, *, workers: int | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Sizes, exponent entropy, ratio vs the order-0 floor: by layer x projection, projection, layer, total.

    Decodes every E shard (checksums verified on the way): a diagnostic, not a fast path.
    """
    with StoreReader(path, direct_io=False) as reader:
        m = reader.manifest
        decoder = _Decoder(reader)
        split = [e for e in m.experts if e.mode == "split"]
        cells: dict[tuple[int, str], _Row] = {}
        with _bar(progress, sum(_original_bytes(e) for e in split), "inspect") as bar:
            for entry, rows in _ordered_map(lambda e: _expert_rows(decoder, e), split, workers, bar):
                for proj, row in rows:
                    cells.setdefault((entry.key.layer, proj), _Row()).add(row)
        by_proj: dict[str, _Row] = {}
        by_layer: dict[int, _Row] = {}
        total = _Row()
        for (layer, proj), row in cells.items():
            by_proj.setdefault(proj, _Row()).add(row)
            by_layer.setdefault(layer, _Row()).add(row)
            total.add(row)
        raw = [e for e in m.experts if e.mode == "raw"]
        sizes = reader.expert_bytes
        return {
            "store": str(Path(path)), "model_type": m.model_type, "format_version": m.format_version,
            "codec": {"id": m.codec_id, "params": dict(m.codec_params), "k": m.k},
            "experts": len(m.experts), "moe_layers": len(by_layer), "raw_experts": len(raw),
            "total": total.to_json(),
            "by_projection": [{"proj": p, **r.to_json()} for p, r in by_proj.items()],
            "by_layer": [{"layer": lay, **r.to_json()} for lay, r in sorted(by_layer.items())],
            "by_layer_projection": [{"layer": lay, "proj": p, **r.to_json()}
                                    for (lay, p), r in sorted(cells.items(), key=lambda c: c[0][0])],
            "files": {"experts_bin_bytes": m.files[DATA_NAME].size, "raw_expert_bytes": sizes.raw,
                      "dense_bytes": sum(m.files[n].size for n in m.dense_files),
                      "other_bytes": sum(r.size for n, r in m.files.items()
                                         if n != DATA_NAME and n not in m.dense_files)},
        }


# ---------------------------------------------------------------- verify
@dataclass(frozen=True)
class VerifyReport:
    """What verify_store checked; every count is of items that matched."""

    store: str  # store directory
    experts: int  # experts decoded and matched against their recorded tensor checksums
    tensors: int  # expert tensors (projections) matched
    expert_bytes: int  # original bytes of those tensors
    checked_bytes: int  # bytes re-read for chunk and file checksums
    against: str | None = None  # the checkpoint compared with, if any
    dense_tensors: int = 0  # dense tensors compared bit-for-bit with the checkpoint
    files_compared: int = 0  # copied files (config, tokenizer) compared with the checkpoint's


def verify_store(path: str | os.PathLike, *, against: str | os.PathLike | None = None,
                 workers: int | None = None, progress: bool = True) -> VerifyReport:
    """Check every checksum; decode every expert and match its recorded per-tensor checksums; with
    `against`, also compare every expert and dense tensor bit-for-bit with the original checkpoint.

    Raises ChecksumError / StoreFormatError for corruption, VerificationError naming the first differing tensor.
    """
    with StoreReader(path, direct_io=False) as reader:
        m = reader.manifest
        total_files = sum(r.size for r in m.files.values())
        with _bar(progress, total_files, "checksums") as bar:
            reader.verify_all(progress=bar.update)
            bar.update(total_files - bar.n)  # the tail padding of experts.bin is checked but not reported
        if against is not None:
            extra = _compare_with_checkpoint(reader, against, workers, progress)
        else:
            extra = _decode_all(reader, workers, progress)
        return VerifyReport(store=str(path), checked_bytes=total_files, against=None if against is None
                            else str(against), **extra)


def check_tensor_checksums(entry: ExpertEntry, flat: np.ndarray) -> None:
    """Decoded bits of an expert vs the xxh3 of the original bytes the converter recorded per tensor."""
    for t in entry.tensors:
        size = DTYPE_SIZES[t.dtype]
        part = flat.view(np.uint8)[t.offset * size : (t.offset + t.numel) * size]
        if xxhash.xxh3_64_intdigest(part) != t.checksum:
            raise VerificationError(
                f"{entry.key} tensor {t.name!r} ({t.hf_name or 'fused'}): decoded bytes do not match the "
                "checksum recorded at conversion — the store is corrupt or was written by a buggy coder; "
                "re-run zipmoe convert")


def _decode_all(reader: StoreReader, workers: int | None, progress: bool) -> dict[str, int]:
    decoder = _Decoder(reader)
    entries = list(reader.manifest.experts)

    def check(entry: ExpertEntry) -> None:
        check_tensor_checksums(entry, decoder.weights(entry))

    with _bar(progress, sum(_original_bytes(e) for e in entries), "decode") as bar:
        for _ in _ordered_map(check, entries, workers, bar):
            pass
    return {"experts": len(entries), "tensors": sum(len(e.tensors) for e in entries),
            "expert_bytes": sum(_original_bytes(e) for e in entries)}


def _compare_with_checkpoint(reader: StoreReader, against: str | os.PathLike, workers: int | None,
                             progress: bool) -> dict[str, int]:
    """Every expert and dense tensor and every copied file, bit-for-bit against the HF checkpoint."""
    from zipmoe.checkpoint import Checkpoint  # torch and the adapters load only for --against
    from zipmoe.convert import read_expert
    from zipmoe.models.plan import checkpoint_plan

    ckpt = Checkpoint.open(against)
    try:
        plan = checkpoint_plan(ckpt.root, ckpt.names, ckpt.config, shapes=ckpt.shapes)
        _same_keys("routed expert", sorted(reader.entries), sorted(plan.experts), against)
        decoder = _Decoder(reader)
        entries = list(reader.manifest.experts)

        def check(entry: ExpertEntry) -> None:
            flat = decoder.weights(entry)
            check_tensor_checksums(entry, flat)
            for t, (src, arr) in zip(entry.tensors, read_expert(ckpt, plan.experts[entry.key]), strict=True):
                size = DTYPE_SIZES[t.dtype]
                got = flat.view(np.uint8)[t.offset * size : (t.offset + t.numel) * size]
                _same_bytes(f"{entry.key} {t.name} ({src.tensor})", t.shape, got, arr)

        with _bar(progress, sum(_original_bytes(e) for e in entries), "compare") as bar:
            for _ in _ordered_map(check, entries, workers, bar):
                pass
        dense = _compare_dense(reader, ckpt, plan.dense)
        skip = {DATA_NAME, *reader.manifest.dense_files}
        files = [n for n in sorted(reader.manifest.files) if n not in skip and (ckpt.root / n).is_file()]
        for name in files:
            if (ckpt.root / name).read_bytes() != reader.file_path(name).read_bytes():
                raise VerificationError(f"{name} in the store differs from {ckpt.root / name}")
    finally:
        ckpt.close()
    return {"experts": len(entries), "tensors": sum(len(e.tensors) for e in entries),
            "expert_bytes": sum(_original_bytes(e) for e in entries), "dense_tensors": dense,
            "files_compared": len(files)}


def _compare_dense(reader: StoreReader, ckpt: Any, names: Sequence[str]) -> int:
    from zipmoe.checkpoint import Checkpoint

    stored = Checkpoint(reader.path, reader.config, list(reader.manifest.dense_files), None)
    try:
        _same_keys("dense tensor", stored.names, sorted(names), ckpt.root)
        for name in stored.names:
            if stored.dtype(name) != ckpt.dtype(name):
                raise VerificationError(f"dense tensor {name!r} is {stored.dtype(name)} in the store but "
                                    f"{ckpt.dtype(name)} in {ckpt.root}")
            _same_bytes(f"dense tensor {name!r}", stored.shapes[name], stored.read(name), ckpt.read(name))
        return len(stored.names)
    finally:
        stored.close()


def _same_keys(what: str, stored: Sequence[Any], original: Sequence[Any], against: Any) -> None:
    if stored != original:
        missing = sorted(set(original) - set(stored))
        extra = sorted(set(stored) - set(original))
        detail = f"missing {missing[0]}" if missing else f"not in the checkpoint: {extra[0]}"
        raise VerificationError(f"the store's {what}s differ from {against}'s ({detail}); was the store "
                            "converted from another checkpoint?")


def _same_bytes(where: str, shape: Sequence[int], got: np.ndarray, want: np.ndarray) -> None:
    """Bit-for-bit equality of a decoded tensor and the original; the message locates the first difference."""
    a, b = got.reshape(-1).view(np.uint8), np.ascontiguousarray(want).reshape(-1).view(np.uint8)
    if tuple(shape) != tuple(want.shape) or a.size != b.size:
        raise VerificationError(f"{where}: shape {list(shape)} in the store but {list(want.shape)} in the "
                            "checkpoint")
    if not np.array_equal(a, b):
        first = int(np.flatnonzero(a != b)[0])
        raise VerificationError(f"{where}: differs from the checkpoint (first differing byte {first} of "
                            f"{a.size})")
