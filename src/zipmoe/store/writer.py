"""Store writer: deterministic, atomic, resumable (FORMAT.md §6).

Arrow: converter (planes encoded by codec/) -> StoreWriter -> `<dest>.zipmoe-tmp/` -> finalize() -> `<dest>/`.
Experts arrive already encoded, in sorted key order; each is appended 4 KiB-aligned to experts.bin and
journaled, so a killed run resumes from its verified prefix. The manifest is written last, after every
other byte is fsynced, then the temp dir is renamed onto dest. One thread drives a writer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import xxhash

from zipmoe.errors import ConversionError, StoreFormatError
from zipmoe.store import journal
from zipmoe.store.format import (
    CONFIG_NAME,
    DATA_NAME,
    FORMAT_VERSION,
    JOURNAL_NAME,
    MANIFEST_NAME,
    ExpertEntry,
    FileRecord,
    Manifest,
    TensorSpec,
    align_up,
    check_file_name,
    validate,
    validate_entry,
)
from zipmoe.store.fsio import (
    check_destination,
    clear_dir,
    file_record,
    fsync_dir,
    lock_dir,
    os_errors,
    write_durable,
)
from zipmoe.store.manifest_json import encode_manifest
from zipmoe.types import ChunkRef, ExpertKey

Buffer = bytes | bytearray | memoryview | np.ndarray
TMP_SUFFIX = ".zipmoe-tmp"
log = logging.getLogger(__name__)


class StoreWriter:
    """Builds a store in `<dest>.zipmoe-tmp` and renames it onto dest in finalize()."""

    def __init__(
        self,
        dest: str | os.PathLike,
        *,
        codec_id: str,
        k: int,
        model_type: str,
        codec_params: Mapping[str, Any] | None = None,
        metadata: Mapping[str, str] | None = None,
        overwrite: bool = False,
        source_fingerprint: str = "",
    ):
        self.dest = Path(dest).absolute()
        self.tmp = self.dest.with_name(self.dest.name + TMP_SUFFIX)
        self.codec_id, self.k, self.model_type = codec_id, k, model_type
        self.codec_params, self.metadata = dict(codec_params or {}), dict(metadata or {})
        self.overwrite = overwrite
        try:  # the journal header: a re-run reuses experts only if all of it matches
            self._header = json.loads(
                json.dumps(
                    {
                        "format_version": FORMAT_VERSION,
                        "codec_id": codec_id,
                        "codec_params": self.codec_params,
                        "k": k,
                        "model_type": model_type,
                        "source": source_fingerprint,
                    },
                    allow_nan=False,
                )
            )
        except (TypeError, ValueError) as exc:
            raise ConversionError(f"codec parameters must be plain JSON values: {exc}") from None
        if not codec_id or k < 1:
            raise ConversionError(f"a store needs a codec id and k >= 1, got {codec_id!r} and k={k}")
        self._files: dict[str, FileRecord] = {}
        self._dense: list[str] = []
        self._lock_fd: int | None = None
        self._data: Any = None
        self._journal: Any = None
        check_destination(self.dest, overwrite)
        try:
            with os_errors(self.dest, "creating the temporary directory"):
                self.tmp.mkdir(parents=True, exist_ok=True)
                self._lock_fd = lock_dir(self.tmp)
                self._resume()
        except BaseException:
            self.close()  # release the lock and files; the temp dir stays for a re-run
            raise

    def _resume(self) -> None:
        entries, end, self._hasher = journal.recover(self.tmp, self._header)
        clear_dir(self.tmp, keep={DATA_NAME, JOURNAL_NAME} if entries else set())
        self._data = open(self.tmp / DATA_NAME, "r+b" if entries else "w+b")  # noqa: SIM115 - closed in close()
        self._data.truncate(end)
        self._data.seek(end)
        self._pos = end  # bytes of experts.bin written so far
        self._entries = entries
        self._by_key = {e.key: e for e in entries}
        self._journal = journal.start(self.tmp, self._header, entries)
        if entries:
            log.info(
                "resuming an interrupted store write in %s: %d experts re-verified and kept",
                self.tmp,
                len(entries),
            )

    @property
    def completed(self) -> frozenset[ExpertKey]:
        """Experts already stored (including those recovered from an interrupted run): skip encoding them."""
        return frozenset(self._by_key)

    def add_expert(
        self,
        key: ExpertKey,
        tensors: Sequence[TensorSpec],
        sm: Buffer,
        shards: Sequence[Buffer],
        *,
        shard_bounds: Sequence[tuple[int, int]],
        shard_codecs: Sequence[str] | None = None,
    ) -> ExpertEntry:
        """Append one split expert: its SM plane and K coded exponent shards (shard i: shard_bounds[i])."""
        sm_b, shard_b = _view(sm), [_view(s) for s in shards]
        codecs = list(shard_codecs) if shard_codecs is not None else [self.codec_id] * len(shard_b)
        numel = sum(t.numel for t in tensors)
        sm_ref = ChunkRef(
            offset=align_up(self._pos),
            length=len(sm_b),
            raw_length=numel,
            checksum=xxhash.xxh3_64_intdigest(sm_b),
            codec="raw",
        )
        at = align_up(sm_ref.offset + sm_ref.length)
        refs = []
        for data, (lo, hi), codec in zip(shard_b, shard_bounds, codecs, strict=False):
            refs.append(
                ChunkRef(
                    offset=at,
                    length=len(data),
                    raw_length=hi - lo,
                    checksum=xxhash.xxh3_64_intdigest(data),
                    codec=codec,
                )
            )
            at += len(data)
        if not len(shard_b) == len(shard_bounds) == len(codecs):
            raise ConversionError(
                f"{key}: {len(shard_b)} shards, {len(shard_bounds)} bounds, {len(codecs)} codecs"
            )
        entry = ExpertEntry(
            key=key,
            mode="split",
            tensors=tuple(tensors),
            numel=numel,
            sm=sm_ref,
            e_shards=tuple(refs),
            shard_bounds=tuple((int(a), int(b)) for a, b in shard_bounds),
        )
        return self._commit(entry, [sm_b, *shard_b])

    def add_raw_expert(self, key: ExpertKey, tensors: Sequence[TensorSpec], data: Buffer) -> ExpertEntry:
        """Append one expert stored as its tensors' raw bytes (non-BF16 experts, when the user asks)."""
        raw = _view(data)
        ref = ChunkRef(
            offset=align_up(self._pos),
            length=len(raw),
            raw_length=len(raw),
            checksum=xxhash.xxh3_64_intdigest(raw),
            codec="raw",
        )
        entry = ExpertEntry(
            key=key, mode="raw", tensors=tuple(tensors), numel=sum(t.numel for t in tensors), sm=ref
        )
        return self._commit(entry, [raw])

    def _commit(self, entry: ExpertEntry, payloads: list[memoryview]) -> ExpertEntry:
        if self._data is None:
            raise ConversionError(f"the store writer for {self.dest} is closed (finalized or failed); re-run")
        if entry.key in self._by_key:
            return self._already_stored(entry)
        if self._entries and not self._entries[-1].key < entry.key:
            raise ConversionError(
                f"experts must be added in sorted (layer, expert) order: {entry.key} came after "
                f"{self._entries[-1].key}"
            )
        try:
            validate_entry(entry, self.k, self.codec_id)
        except StoreFormatError as exc:
            raise ConversionError(f"cannot store {getattr(exc, 'detail', exc)}") from None
        chunks = [entry.sm, *entry.e_shards]
        with self._failing_closes(f"writing {entry.key}"):
            for chunk, payload in zip(chunks, payloads, strict=True):
                for data in (
                    bytes(chunk.offset - self._pos),
                    payload,
                ):  # zero padding up to the chunk, the chunk
                    _write_bytes(self._data, data)
                    self._hasher.update(data)
                self._pos = chunk.offset + chunk.length
            self._data.flush()  # bytes reach the OS before the journal says so (survives kill -9)
            journal.append(self._journal, entry)
        self._entries.append(entry)
        self._by_key[entry.key] = entry
        return entry

    def _already_stored(self, entry: ExpertEntry) -> ExpertEntry:
        old = self._by_key[entry.key]
        same = [(c.length, c.checksum, c.codec) for c in (entry.sm, *entry.e_shards)] == [
            (c.length, c.checksum, c.codec) for c in (old.sm, *old.e_shards)
        ]
        if not same or old.tensors != entry.tensors or old.shard_bounds != entry.shard_bounds:
            raise ConversionError(
                f"{entry.key} differs from the copy an interrupted run stored in {self.tmp}: the "
                f"input changed; delete {self.tmp} and re-run"
            )
        return old

    def add_dense_file(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Copy a serialized safetensors file of non-expert weights verbatim; returns its store name."""
        name = name or Path(path).name
        if not name.endswith(".safetensors"):
            raise ConversionError(f"dense weight file {name!r} must be a .safetensors file")
        self.copy_file(path, name)
        self._dense.append(name)
        return name

    def add_dense_tensors(
        self,
        tensors: Mapping[str, tuple[str, Sequence[int], Buffer]],
        name: str = "model.safetensors",
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Write non-expert tensors given as name -> (dtype like "bfloat16", shape, little-endian bytes)."""
        target = self._target(name, dense=True)
        keep, specs = [], {}
        try:
            for tname, (dtype, shape, data) in tensors.items():
                arr = np.frombuffer(_view(data), dtype=np.uint8)
                keep.append(arr)
                specs[tname] = safetensors.TensorSpec(
                    dtype=dtype, shape=list(shape), data_ptr=arr.ctypes.data, data_len=arr.nbytes
                )
            with self._failing_closes(f"writing {name}"):
                safetensors.serialize_file(specs, str(target), metadata=dict(metadata) if metadata else None)
                target.chmod(0o644)  # safetensors creates 0600; store files are readable like copied ones
        except (safetensors.SafetensorError, ValueError, TypeError) as exc:
            raise ConversionError(f"cannot write dense tensors to {name}: {exc}") from None
        self._record(name)
        self._dense.append(name)
        return name

    def copy_files(self, paths: Iterable[str | os.PathLike]) -> list[str]:
        """Copy files verbatim under their base names (config.json, generation config, tokenizer files)."""
        return [self.copy_file(p, Path(p).name) for p in paths]

    def copy_file(self, path: str | os.PathLike, name: str) -> str:
        """Copy one file verbatim into the store as `name`."""
        target = self._target(name)
        if not Path(path).is_file():
            raise ConversionError(f"cannot copy {os.fspath(path)!r} into the store: not a file")
        with self._failing_closes(f"copying {name}"):
            shutil.copyfile(path, target)
        self._record(name)
        return name

    def add_file_bytes(self, name: str, data: bytes) -> str:
        """Write `data` into the store as `name` (e.g. a config.json the converter generated)."""
        target = self._target(name)
        with self._failing_closes(f"writing {name}"):
            target.write_bytes(data)
        self._record(name)
        return name

    def _target(self, name: str, dense: bool = False) -> Path:
        try:
            check_file_name(name)
        except StoreFormatError:
            raise ConversionError(f"{name!r} is not a plain relative file name for the store") from None
        if (
            name in self._files
            or name in (DATA_NAME, MANIFEST_NAME)
            or (dense and not name.endswith(".safetensors"))
        ):
            raise ConversionError(f"store file name {name!r} is reserved or already used")
        if self._data is None:
            raise ConversionError(f"the store writer for {self.dest} is closed (finalized or failed); re-run")
        target = self.tmp / name
        with self._failing_closes(f"creating {name}"):
            target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def _record(self, name: str) -> None:
        with self._failing_closes(f"syncing {name}"):
            self._files[name] = file_record(self.tmp / name, fsync=True)

    def finalize(self, check: Callable[[Path], None] | None = None) -> Path:
        """fsync everything, write the manifest last, rename the temp dir onto dest; returns dest.

        check(temp_dir), if given, runs on the finished temp store before it is installed; if it raises, the
        manifest is removed again (the temp dir never looks like a store) and nothing is installed."""
        if CONFIG_NAME not in self._files:
            raise ConversionError(
                "a store needs the model's config.json: add it with copy_files() or add_file_bytes()"
            )
        if self._data is None:
            raise ConversionError(f"the store writer for {self.dest} is closed (finalized or failed); re-run")
        with self._failing_closes("finishing the store"):
            pad = bytes(align_up(self._pos) - self._pos)
            _write_bytes(self._data, pad)
            self._hasher.update(pad)
            self._pos += len(pad)
            self._data.flush()
            os.fsync(self._data.fileno())
            manifest = Manifest(
                codec_id=self.codec_id,
                codec_params=self.codec_params,
                k=self.k,
                model_type=self.model_type,
                experts=tuple(self._entries),
                files={**self._files, DATA_NAME: FileRecord(self._pos, self._hasher.intdigest())},
                dense_files=tuple(self._dense),
                metadata=self.metadata,
            )
            validate(manifest, self._pos)  # never write a store our own reader would reject
            write_durable(self.tmp / MANIFEST_NAME, encode_manifest(manifest))
            self._close_files()
            (self.tmp / JOURNAL_NAME).unlink()
            fsync_dir(self.tmp)
            if check is not None:
                try:
                    check(self.tmp)
                except BaseException:
                    (self.tmp / MANIFEST_NAME).unlink(missing_ok=True)
                    raise
            self._install()
        self.close()
        return self.dest

    def _install(self) -> None:
        check_destination(self.dest, self.overwrite)
        old = None
        if self.dest.exists():  # a fresh, unique place for the store being replaced (PIDs repeat)
            old = Path(tempfile.mkdtemp(prefix=f"{self.dest.name}.zipmoe-old-", dir=self.dest.parent))
            os.rename(self.dest, old)
        try:
            os.rename(self.tmp, self.dest)
        except OSError:
            if old is not None:
                os.rename(old, self.dest)  # put the previous store back
            raise
        fsync_dir(self.dest.parent)
        if old is not None:
            shutil.rmtree(old)

    @contextmanager
    def _failing_closes(self, action: str):
        """OSError -> ConversionError; the writer is closed (its temp dir stays for a resuming re-run)."""
        try:
            with os_errors(self.dest, action):
                yield
        except ConversionError:
            self.close()
            raise

    def _close_files(self) -> None:
        files, self._data, self._journal = (self._data, self._journal), None, None
        for f in files:
            if f is not None:
                f.close()

    def close(self) -> None:
        """Release files and the lock without finishing; the temp dir is kept so a re-run can resume."""
        with suppress(OSError):  # e.g. ENOSPC on flush: the journal prefix on disk stays valid for recover()
            self._close_files()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def discard(self) -> None:
        """Close and delete the temp dir (nothing is resumable afterwards)."""
        self.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_bytes(f: Any, data: Buffer) -> None:
    """The one place expert bytes are written (tests replace it to simulate a full disk)."""
    f.write(data)


def _view(data: Buffer) -> memoryview:
    if isinstance(data, np.ndarray):
        return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    return memoryview(data).cast("B")
