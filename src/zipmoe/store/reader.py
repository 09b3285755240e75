"""Store reader: validates a finished store, then reads expert planes into caller-owned aligned buffers.

Arrow: store/ on disk -> StoreReader -> (SM plane view, E-shard views) -> cache / codec decode.
Every read is checked against its xxh3_64 before anyone computes with it; a mismatch raises
ChecksumError naming the expert and chunk. Reads use os.preadv on one shared fd: any thread may call.
Sizes in bytes; K=exponent shards per expert.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from zipmoe.errors import ChecksumError, StoreIncompleteError, ZipMoEError
from zipmoe.store.aligned import ALIGN, StripedReads, aligned_buffer, aligned_extent, open_direct, read_direct_into
from zipmoe.store.format import (
    CORRUPT_HINT,
    DATA_NAME,
    DTYPE_SIZES,
    JOURNAL_NAME,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    DataFileSizeError,
    ExpertEntry,
    FileSizeError,
    Manifest,
    ManifestTooLargeError,
    MissingFileError,
    align_up,
    validate,
)
from zipmoe.store.fsio import file_record
from zipmoe.store.manifest_json import decode_manifest
from zipmoe.types import ChunkRef, ExpertKey


@dataclass(frozen=True, slots=True)
class ExpertBytes:
    """Byte totals over all experts of a store."""

    sm: int  # SM planes of split experts
    e: int  # coded exponent shards of split experts
    raw: int  # raw experts' bytes
    original: int  # the same experts in their checkpoint dtype (BF16: 2 bytes/element)

    @property
    def stored(self) -> int:
        """Expert bytes on disk, padding excluded."""
        return self.sm + self.e + self.raw


class StoreReader:
    """A validated, open store. Thread-safe reads; close() (or `with`) releases the file descriptor."""

    def __init__(self, path: str | os.PathLike, direct_io: bool | None = None, read_stripes: int = 1,
                 readers: int = 1):
        """read_stripes > 1: split large plane reads into that many concurrent parts (StripedReads);
        readers: how many threads will read at once (the engine: its I/O threads + the prefetcher)."""
        if read_stripes < 1:
            raise ZipMoEError(f"read_stripes must be >= 1 (1: whole reads), got {read_stripes}")
        self.path = Path(path)
        self.manifest = _load_manifest(self.path)
        data_path = self.path / DATA_NAME
        if not data_path.is_file():
            raise MissingFileError(f"store {self.path}: {DATA_NAME} is missing — {CORRUPT_HINT}")
        validate(self.manifest, data_path.stat().st_size)
        for name, record in self.manifest.files.items():
            _check_present(self.path, name, record.size)
        self.entries: dict[ExpertKey, ExpertEntry] = {e.key: e for e in self.manifest.experts}
        self._verified: set[str] = set()
        for name in self.manifest.files:
            if name != DATA_NAME and name not in self.manifest.dense_files:
                self._verify_file(name)  # small files (config, tokenizer): cheap to check at open
        self.config: dict[str, Any] = self._load_config()
        if direct_io is False:
            self._fd, self.direct = os.open(data_path, os.O_RDONLY | os.O_CLOEXEC), False
        else:
            self._fd, self.direct = open_direct(data_path, required=bool(direct_io))
        self.read_stripes = read_stripes
        self._striped = StripedReads(read_stripes, callers=readers) if read_stripes > 1 else None
        self._closer = weakref.finalize(self, _close, self._fd, self._striped)  # no fd leak even without close()
        self.max_sm_bytes = max((align_up(e.sm.length) for e in self.entries.values()), default=0)
        self.max_e_region_bytes = max((align_up(e.e_length) for e in self.entries.values()), default=0)

    def _load_config(self) -> dict[str, Any]:
        try:
            config = json.loads((self.path / "config.json").read_bytes())
        except (OSError, ValueError) as exc:
            raise StoreIncompleteError(
                f"store {self.path}: config.json is unreadable ({exc}) — {CORRUPT_HINT}"
            ) from None
        if not isinstance(config, dict):
            raise StoreIncompleteError(
                f"store {self.path}: config.json is not a JSON object — {CORRUPT_HINT}"
            )
        return config

    @property
    def expert_bytes(self) -> ExpertBytes:
        """Totals by plane over all experts."""
        split = [e for e in self.entries.values() if e.mode == "split"]
        raw = [e for e in self.entries.values() if e.mode == "raw"]
        return ExpertBytes(
            sm=sum(e.sm.length for e in split),
            e=sum(e.e_length for e in split),
            raw=sum(e.sm.length for e in raw),
            original=sum(e.numel * DTYPE_SIZES[e.tensors[0].dtype] for e in self.entries.values()),
        )

    def read_sm_into(self, entry: ExpertEntry, buf: np.ndarray, *, part: int | None = None,
                     stop: Callable[[], bool] | None = None) -> np.ndarray:
        """Read and verify the SM plane (raw experts: their bytes) into buf; returns the view of it.

        buf: page-aligned uint8 (aligned_buffer) of at least max_sm_bytes. part/stop: read in parts and
        raise ReadStopped when stop() says so between two (aligned.read_direct_into; never striped).
        """
        self._read(entry, _sm_label(entry), entry.sm.offset, entry.sm.length, buf, part, stop)
        return self.landed_sm(entry, buf)

    def read_target(self, entry: ExpertEntry, sm: bool, buf: np.ndarray) -> tuple[int, int, int]:
        """(file start, bytes, buffer address) of the aligned read that brings the SM plane (sm) or the E region
        into buf: for a caller that reads it itself (store/native_reads) and then calls landed_sm / landed_e.
        The fd is `self.fd`. Same buffer rules and errors as read_sm_into / read_e_into."""
        if not self._closer.alive:
            raise ZipMoEError(f"store {self.path} is closed")
        offset, length = (entry.sm.offset, entry.sm.length) if sm else (entry.e_offset, entry.e_length)
        start, span = aligned_extent(offset, length, buf)
        return start, span, buf.ctypes.data

    @property
    def fd(self) -> int:
        """The data file's descriptor (O_DIRECT when self.direct), for read_target's callers."""
        return self._fd

    def landed_sm(self, entry: ExpertEntry, buf: np.ndarray) -> np.ndarray:
        """The verified SM plane in buf once its aligned read is in (read_target's, or read_sm_into's own)."""
        lo = entry.sm.offset % ALIGN
        view = buf[lo : lo + entry.sm.length]
        _verify_chunk(entry, _sm_label(entry), entry.sm, view)
        return view

    def landed_e(self, entry: ExpertEntry, buf: np.ndarray, verify: bool = False) -> list[np.ndarray]:
        """The K E-shard views in buf after read_target's read: what read_e_into(verify=verify) returns
        (unverified by default: the decode workers check each shard)."""
        lo = entry.e_offset % ALIGN
        return _shard_views(entry, buf[lo : lo + entry.e_length], verify=verify)

    def read_e_into(self, entry: ExpertEntry, buf: np.ndarray, verify: bool = True, *, part: int | None = None,
                    stop: Callable[[], bool] | None = None) -> list[np.ndarray]:
        """Read all K E-shards of an expert with one read of its E region; one view per shard.

        buf: page-aligned uint8 of at least max_e_region_bytes. Raw experts have no shards: [].
        verify=False leaves the checks to the caller, who must call verify_shard(entry, i, view) on
        each shard before decoding it (the engine does so on its decode workers, off the I/O thread).
        part/stop: as for read_sm_into.
        """
        if not entry.e_shards:
            return []
        region = self._read(entry, "E region", entry.e_offset, entry.e_length, buf, part, stop)
        return _shard_views(entry, region, verify)

    @staticmethod
    def verify_shard(entry: ExpertEntry, shard: int, view: np.ndarray) -> None:
        """Check one E-shard read with read_e_into(verify=False); raises ChecksumError naming it."""
        _verify_chunk(entry, f"E-shard {shard}", entry.e_shards[shard], view)

    def _read(self, entry: ExpertEntry, plane: str, offset: int, length: int, buf: np.ndarray,
              part: int | None = None, stop: Callable[[], bool] | None = None) -> np.ndarray:
        if not self._closer.alive:
            raise ZipMoEError(f"store {self.path} is closed")
        try:
            if self._striped is not None and part is None and stop is None:
                return self._striped.read_into(self._fd, offset, length, buf)
            return read_direct_into(self._fd, offset, length, buf, part=part, stop=stop)
        except RuntimeError:  # the stripe pool was shut down by a close() racing this read
            raise ZipMoEError(f"store {self.path} is closed") from None
        except EOFError as exc:
            raise DataFileSizeError(
                f"{entry.key} {plane} at offset {offset}: {DATA_NAME} {exc} (truncated "
                f"while open?) — {CORRUPT_HINT}"
            ) from None

    def dense_files(self, verify: bool = True) -> list[Path]:
        """Paths of the safetensors files with the non-expert weights (load them with safetensors.torch)."""
        if verify:
            for name in self.manifest.dense_files:
                self._verify_file(name)
        return [self.path / name for name in self.manifest.dense_files]

    def file_path(self, name: str) -> Path:
        """Path of a store file the manifest lists (tokenizer files, generation_config.json, ...)."""
        if name not in self.manifest.files:
            raise KeyError(f"store {self.path} has no file {name!r}")
        return self.path / name

    def verify_all(self, progress: Callable[[int], None] | None = None) -> None:
        """Check every checksum of every file: each chunk, zero padding, each whole file. progress(bytes)."""
        for name in sorted(self.manifest.files):
            if name != DATA_NAME:
                self._verified.discard(name)
                self._verify_file(name)
                if progress:
                    progress(self.manifest.files[name].size)
        self._verify_data(progress)

    def _verify_data(self, progress: Callable[[int], None] | None) -> None:
        """One sequential pass over experts.bin: chunk checksums, zero padding, whole-file checksum."""
        hasher, end = xxhash.xxh3_64(), 0
        with open(self.path / DATA_NAME, "rb") as f:
            for entry in self.manifest.experts:
                chunks = [("SM plane" if entry.mode == "split" else "raw data", entry.sm)]
                chunks += [(f"E-shard {i}", c) for i, c in enumerate(entry.e_shards)]
                stop = max(c.offset + c.length for _, c in chunks)
                data = memoryview(_read_exact(f, end, stop - end, self.path))
                pads = [(end, entry.sm.offset, chunks[0][0])]  # padding before the SM chunk and the E region
                if entry.e_shards:
                    pads.append((entry.sm.offset + entry.sm.length, entry.e_offset, "E region"))
                for lo, hi, plane in pads:
                    _check_padding(data[lo - end : hi - end], f"before {entry.key} {plane}", lo)
                for plane, c in chunks:
                    _verify_chunk(entry, plane, c, data[c.offset - end : c.offset - end + c.length])
                hasher.update(data)
                if progress:
                    progress(len(data))
                end = stop
            tail = _read_exact(f, end, self.manifest.files[DATA_NAME].size - end, self.path)
        _check_padding(memoryview(tail), "at the end of the file", end)
        hasher.update(tail)
        if hasher.intdigest() != self.manifest.files[DATA_NAME].checksum:
            raise ChecksumError(
                f"store {self.path}: {DATA_NAME}: whole-file checksum mismatch — {CORRUPT_HINT}"
            )

    def _verify_file(self, name: str) -> None:
        if name in self._verified:
            return
        record = self.manifest.files[name]
        try:
            actual = file_record(self.path / name)
        except OSError as exc:
            raise MissingFileError(
                f"store {self.path}: cannot read {name} ({exc}) — {CORRUPT_HINT}"
            ) from None
        if actual != record:
            raise ChecksumError(
                f"store {self.path}: {name}: checksum mismatch (size {actual.size}, expected "
                f"{record.size}) — {CORRUPT_HINT}"
            )
        self._verified.add(name)

    def close(self) -> None:
        """Close the data file descriptor and join the stripe threads (idempotent)."""
        self._closer()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def new_sm_buffer(self) -> np.ndarray:
        """A page-aligned buffer big enough for any expert's SM plane."""
        return aligned_buffer(self.max_sm_bytes)

    def new_e_buffer(self) -> np.ndarray:
        """A page-aligned buffer big enough for any expert's E region."""
        return aligned_buffer(self.max_e_region_bytes)


def _load_manifest(path: Path) -> Manifest:
    if not path.is_dir():
        raise StoreIncompleteError(f"{path} is not a zipmoe store directory (create one with zipmoe convert)")
    if (path / JOURNAL_NAME).exists():
        raise StoreIncompleteError(
            f"{path} is an unfinished store (a conversion was interrupted); re-run zipmoe "
            "convert with the same arguments to finish it"
        )
    try:
        with open(path / MANIFEST_NAME, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise StoreIncompleteError(
            f"{path} has no {MANIFEST_NAME}: not a complete zipmoe store (an interrupted "
            "conversion?); re-run zipmoe convert"
        ) from None
    except OSError as exc:
        raise StoreIncompleteError(f"cannot read {path / MANIFEST_NAME}: {exc}") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestTooLargeError(
            f"{path / MANIFEST_NAME} is over the {MAX_MANIFEST_BYTES}-byte cap — {CORRUPT_HINT}"
        )
    return decode_manifest(data)


def _check_present(root: Path, name: str, size: int) -> None:
    path = root / name
    if not path.is_file():
        raise MissingFileError(f"store {root}: {name} is missing — {CORRUPT_HINT}")
    actual = path.stat().st_size
    if actual != size:
        raise FileSizeError(
            f"store {root}: {name} is {actual} bytes, the manifest records {size} — {CORRUPT_HINT}"
        )


def _close(fd: int, striped: StripedReads | None) -> None:
    if striped is not None:
        striped.close()  # first: no part may still be reading from fd
    os.close(fd)


def _sm_label(entry: ExpertEntry) -> str:
    return "SM plane" if entry.mode == "split" else "raw data"


def _shard_views(entry: ExpertEntry, region: np.ndarray, verify: bool) -> list[np.ndarray]:
    views, at = [], 0
    for i, chunk in enumerate(entry.e_shards):
        view = region[at : at + chunk.length]
        if verify:
            _verify_chunk(entry, f"E-shard {i}", chunk, view)
        views.append(view)
        at += chunk.length
    return views


def _verify_chunk(entry: ExpertEntry, plane: str, chunk: ChunkRef, view: Any) -> None:
    if xxhash.xxh3_64_intdigest(view) != chunk.checksum:
        raise ChecksumError(
            f"{entry.key} {plane} at offset {chunk.offset} (length {chunk.length}) in {DATA_NAME}: "
            f"checksum mismatch — {CORRUPT_HINT}"
        )


def _check_padding(pad: memoryview, where: str, offset: int) -> None:
    if any(pad.tobytes()):
        raise ChecksumError(f"{DATA_NAME}: padding {where} (offset {offset}) is not zero — {CORRUPT_HINT}")


def _read_exact(f: Any, offset: int, n: int, root: Path) -> bytes:
    f.seek(offset)
    data = f.read(n)
    if len(data) != n:
        raise DataFileSizeError(
            f"store {root}: {DATA_NAME} ends at {offset + len(data)}, expected {offset + n} — {CORRUPT_HINT}"
        )
    return data
