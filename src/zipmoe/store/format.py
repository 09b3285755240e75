"""Store header model: the manifest dataclasses, one error class per broken invariant, and validate().

Arrow: writer builds a Manifest -> manifest_json serializes it -> reader parses it and calls validate()
before touching experts.bin. Pure data and arithmetic: no files, no threads, no torch.
Normative spec: store/FORMAT.md (this module implements its section 4, "Invariants").
K=exponent shards per expert; offsets and lengths in bytes unless a field says elements.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from zipmoe.errors import StoreFormatError, StoreIncompleteError
from zipmoe.types import ChunkRef, ExpertKey

FORMAT_VERSION = 1  # major: a reader rejects a store whose major is newer than this
FORMAT_MINOR = 0  # minor: additive, optional fields only; older readers ignore unknown fields of newer minors
MANIFEST_NAME = "zipmoe.json"
DATA_NAME = "experts.bin"
CONFIG_NAME = "config.json"
JOURNAL_NAME = ".zipmoe-journal"  # present only while a writer has not finished: never a valid store
ALIGN = 4096  # every region of experts.bin starts at a multiple of this (O_DIRECT)
MAX_MANIFEST_BYTES = 256 * 1024 * 1024  # header size cap, checked before reading the manifest
MAX_INT = 2**63 - 1  # every integer field fits a signed 64-bit int (C readers, numpy)
MODES = ("split", "raw")  # split: SM plane + K coded exponent shards; raw: tensor bytes stored as-is
DTYPE_SIZES = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "bool": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
CORRUPT_HINT = "the store is corrupt; re-run zipmoe convert"


# ---- one error class per broken invariant (all StoreFormatError) ----
class ManifestTooLargeError(StoreFormatError):
    """zipmoe.json is larger than MAX_MANIFEST_BYTES."""


class ManifestSyntaxError(StoreFormatError):
    """zipmoe.json is not the JSON envelope FORMAT.md §3 describes."""


class ManifestChecksumError(StoreFormatError):
    """zipmoe.json's bytes do not match its own xxh3_64."""


class MissingFieldError(StoreFormatError):
    """A required manifest field is absent."""


class UnknownFieldError(StoreFormatError):
    """A manifest field this format version does not define (same or older minor)."""


class FieldTypeError(StoreFormatError):
    """A manifest field has the wrong JSON type or is out of range."""


class BadFileNameError(StoreFormatError):
    """A file name in the manifest is not a plain relative name inside the store."""


class MissingFileError(StoreIncompleteError):
    """A file the manifest lists (or requires) is absent."""


class FileSizeError(StoreFormatError):
    """A store file's size differs from the size the manifest records."""


class UnsortedExpertsError(StoreFormatError):
    """Expert entries are duplicated or not sorted by (layer, expert)."""


class TensorLayoutError(StoreFormatError):
    """An expert's tensor specs do not tile its flat vector (offsets, numel, shape, dtype)."""


class ShardCountError(StoreFormatError):
    """An expert does not have exactly K exponent shards (or a raw expert has any)."""


class ShardBoundsError(StoreFormatError):
    """Shard bounds do not partition [0, numel) into K non-empty contiguous ranges."""


class ChunkLengthError(StoreFormatError):
    """A chunk's length or raw_length is zero or disagrees with what it stores."""


class UnknownCodecError(StoreFormatError):
    """A chunk names a codec the manifest does not declare."""


class MisalignedChunkError(StoreFormatError):
    """A region (SM chunk or E region) does not start at a multiple of 4096."""


class OverlappingChunksError(StoreFormatError):
    """A region starts before the previous region ends."""


class LayoutGapError(StoreFormatError):
    """Bytes between regions are more than alignment padding, or shards of an E region are not adjacent."""


class ChunkOutOfBoundsError(StoreFormatError):
    """A region ends beyond the end of experts.bin."""


class DataFileSizeError(StoreFormatError):
    """experts.bin is not exactly covered by its regions plus padding."""


# ---- the header model ----
@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One projection tensor inside an expert's flat vector."""

    name: str  # projection: "gate", "up", "down", ... (adapter's canonical order)
    hf_name: str  # original checkpoint tensor name; "" for fused sources
    shape: tuple[int, ...]  # logical shape, elements
    dtype: str  # "bfloat16" in split experts; the stored dtype in raw experts
    offset: int  # elements from the start of the expert's flat vector
    numel: int  # elements
    checksum: int  # xxh3_64 of the original tensor bytes (little-endian, row-major)


@dataclass(frozen=True, slots=True)
class ExpertEntry:
    """Where one expert's planes live and how to rebuild it."""

    key: ExpertKey
    mode: str  # "split" | "raw" (MODES)
    tensors: tuple[TensorSpec, ...]  # in flat-vector order
    numel: int  # elements of the flat vector
    sm: ChunkRef  # split: SM plane (1 byte/element, codec "raw"); raw: the tensors' bytes
    e_shards: tuple[ChunkRef, ...] = ()  # split: K coded exponent shards, adjacent in one region
    shard_bounds: tuple[tuple[int, int], ...] = ()  # split: element range [lo, hi) of each shard

    @property
    def e_offset(self) -> int:
        """Start of the E region (bytes into experts.bin); 0 for raw experts."""
        return self.e_shards[0].offset if self.e_shards else 0

    @property
    def e_length(self) -> int:
        """Bytes of the E region (all shards, one read)."""
        return sum(c.length for c in self.e_shards)

    def tensor(self, name: str) -> TensorSpec:
        """The projection called `name` (KeyError if absent)."""
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"{self.key} has no tensor {name!r}")


@dataclass(frozen=True, slots=True)
class FileRecord:
    """Size and checksum of one store file other than the manifest."""

    size: int  # bytes
    checksum: int  # xxh3_64 of the whole file


@dataclass(frozen=True, slots=True)
class Manifest:
    """The whole header (zipmoe.json)."""

    codec_id: str  # exponent coder id used by E shards (codec/coders registry); chunks may also be "raw"
    codec_params: Mapping[str, Any]  # parameters the coder was built with (JSON values)
    k: int  # exponent shards per split expert
    model_type: str  # HF config.json model_type
    experts: tuple[ExpertEntry, ...]  # sorted by key; also the order of regions in experts.bin
    files: Mapping[str, FileRecord]  # every store file except the manifest, by relative name
    dense_files: tuple[str, ...] = ()  # safetensors files holding the non-expert weights
    metadata: Mapping[str, str] = field(default_factory=dict)  # free text (converter version, source)
    format_version: int = FORMAT_VERSION
    format_minor: int = FORMAT_MINOR


def align_up(n: int, align: int = ALIGN) -> int:
    """Smallest multiple of `align` that is >= n."""
    return -(-n // align) * align


def _fail(cls: type[StoreFormatError], where: str, what: str) -> StoreFormatError:
    err = cls(f"store manifest: {where}: {what} — {CORRUPT_HINT}")
    err.detail = f"{where}: {what}"  # type: ignore[attr-defined]  # the writer reports this without the hint
    return err


def validate(manifest: Manifest, data_file_size: int) -> None:
    """Check every invariant of FORMAT.md §4 against the real size of experts.bin; raise the named error."""
    _validate_files(manifest)
    recorded = manifest.files[DATA_NAME].size
    if recorded != data_file_size:
        raise _fail(
            DataFileSizeError,
            DATA_NAME,
            f"file is {data_file_size} bytes but the manifest records {recorded} (truncated or appended)",
        )
    previous: ExpertKey | None = None
    end = 0  # end of the previous region, bytes
    for entry in manifest.experts:
        if previous is not None and not previous < entry.key:
            raise _fail(
                UnsortedExpertsError, str(entry.key), f"comes after {previous}: duplicate or unsorted"
            )
        previous = entry.key
        validate_entry(entry, manifest.k, manifest.codec_id)
        if entry.mode == "split":
            end = _check_region(entry, "SM plane", entry.sm.offset, entry.sm.length, end, data_file_size)
            end = _check_region(entry, "E region", entry.e_offset, entry.e_length, end, data_file_size)
        else:
            end = _check_region(entry, "raw data", entry.sm.offset, entry.sm.length, end, data_file_size)
    if align_up(end) != data_file_size:
        raise _fail(
            DataFileSizeError,
            DATA_NAME,
            f"regions end at {end} (padded {align_up(end)}) but the file is {data_file_size} bytes",
        )


def validate_entry(entry: ExpertEntry, k: int, codec_id: str) -> None:
    """Invariants of one expert alone (tensors, shards, chunk lengths, codecs); validate() checks layout."""
    _validate_tensors(entry)
    if entry.mode == "split":
        _validate_split(entry, k, codec_id)
    else:
        _validate_raw(entry)


def _validate_files(manifest: Manifest) -> None:
    if not manifest.codec_id or manifest.k < 1:
        raise _fail(FieldTypeError, "codec", f"codec id {manifest.codec_id!r} and k={manifest.k} must be set")
    for name in manifest.files:
        check_file_name(name)
    for name in (DATA_NAME, CONFIG_NAME):
        if name not in manifest.files:
            raise _fail(MissingFileError, "files", f"required file {name} is not listed")
    for name in manifest.dense_files:
        if name not in manifest.files or not name.endswith(".safetensors"):
            raise _fail(BadFileNameError, "dense_files", f"{name!r} is not a listed .safetensors file")


def check_file_name(name: str) -> None:
    """A store file name: relative, '/'-separated, no '..', not reserved."""
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or any(p in ("", ".", "..") for p in parts)
        or name in (MANIFEST_NAME, JOURNAL_NAME)
    ):
        raise _fail(BadFileNameError, "files", f"{name!r} is not a plain relative file name inside the store")


def _validate_tensors(entry: ExpertEntry) -> None:
    where = str(entry.key)
    if entry.mode not in MODES or not entry.tensors:
        raise _fail(TensorLayoutError, where, f"mode {entry.mode!r} with {len(entry.tensors)} tensors")
    offset = 0
    names = set()
    for t in entry.tensors:
        product = 1
        for dim in t.shape:
            product *= dim
        if t.name in names or t.offset != offset or t.numel != product or t.numel < 1:
            raise _fail(
                TensorLayoutError,
                f"{where} tensor {t.name!r}",
                f"offset {t.offset} (expected {offset}), numel {t.numel}, shape {list(t.shape)}",
            )
        if t.dtype not in DTYPE_SIZES or (entry.mode == "split") != (t.dtype == "bfloat16"):
            raise _fail(
                TensorLayoutError, f"{where} tensor {t.name!r}", f"dtype {t.dtype!r} in a {entry.mode} expert"
            )
        names.add(t.name)
        offset += t.numel
    if offset != entry.numel or offset > MAX_INT:
        raise _fail(TensorLayoutError, where, f"tensors hold {offset} elements but numel is {entry.numel}")


def _validate_split(entry: ExpertEntry, k: int, codec_id: str) -> None:
    where = str(entry.key)
    if len(entry.e_shards) != k or len(entry.shard_bounds) != k:
        raise _fail(
            ShardCountError,
            where,
            f"{len(entry.e_shards)} E-shards and {len(entry.shard_bounds)} bounds, K is {k}",
        )
    lo = 0
    for i, (a, b) in enumerate(entry.shard_bounds):
        if a != lo or b <= a:
            raise _fail(
                ShardBoundsError, f"{where} E-shard {i}", f"bounds [{a}, {b}) do not continue at {lo}"
            )
        lo = b
    if lo != entry.numel:
        raise _fail(ShardBoundsError, where, f"shards cover {lo} elements of {entry.numel}")
    _check_chunk(entry, "SM plane", entry.sm, entry.numel, ("raw",))
    if entry.sm.length != entry.numel:
        raise _fail(ChunkLengthError, f"{where} SM plane", f"length {entry.sm.length} != numel {entry.numel}")
    at = entry.e_offset
    for i, (chunk, (a, b)) in enumerate(zip(entry.e_shards, entry.shard_bounds, strict=True)):
        _check_chunk(entry, f"E-shard {i}", chunk, b - a, (codec_id, "raw"))
        if chunk.offset != at:
            raise _fail(
                LayoutGapError, f"{where} E-shard {i}", f"offset {chunk.offset}, expected {at} (adjacent)"
            )
        at += chunk.length


def _validate_raw(entry: ExpertEntry) -> None:
    where = str(entry.key)
    if entry.e_shards or entry.shard_bounds:
        raise _fail(ShardCountError, where, "a raw expert has no exponent shards")
    dtypes = {t.dtype for t in entry.tensors}
    if len(dtypes) != 1:
        raise _fail(TensorLayoutError, where, f"a raw expert has one dtype, got {sorted(dtypes)}")
    _check_chunk(entry, "raw data", entry.sm, entry.numel * DTYPE_SIZES[dtypes.pop()], ("raw",))


def _check_chunk(
    entry: ExpertEntry, plane: str, chunk: ChunkRef, raw_length: int, codecs: tuple[str, ...]
) -> None:
    where = f"{entry.key} {plane}"
    if chunk.codec not in codecs:
        raise _fail(UnknownCodecError, where, f"codec {chunk.codec!r}, expected one of {list(codecs)}")
    if chunk.raw_length != raw_length or chunk.length < 1 or chunk.length > MAX_INT:
        raise _fail(
            ChunkLengthError,
            where,
            f"length {chunk.length}, raw_length {chunk.raw_length}, expected raw_length {raw_length}",
        )
    if chunk.codec == "raw" and chunk.length != chunk.raw_length:
        raise _fail(
            ChunkLengthError, where, f"raw chunk length {chunk.length} != raw_length {chunk.raw_length}"
        )


def _check_region(entry: ExpertEntry, plane: str, start: int, length: int, prev_end: int, size: int) -> int:
    """Regions follow each other in manifest order, each at the next 4096 boundary; returns the new end."""
    where = f"{entry.key} {plane}"
    if start % ALIGN:
        raise _fail(MisalignedChunkError, where, f"offset {start} is not a multiple of {ALIGN}")
    if start < prev_end:
        raise _fail(
            OverlappingChunksError, where, f"offset {start} overlaps the previous region ending at {prev_end}"
        )
    if start != align_up(prev_end):
        raise _fail(
            LayoutGapError, where, f"offset {start}, expected {align_up(prev_end)}: a hole in experts.bin"
        )
    if length > size - start:
        raise _fail(
            ChunkOutOfBoundsError, where, f"bytes [{start}, {start + length}) beyond the file end {size}"
        )
    return start + length
