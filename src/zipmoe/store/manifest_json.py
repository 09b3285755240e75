"""Manifest <-> zipmoe.json bytes: a self-checksummed JSON envelope, strict field-by-field parsing.

Arrow: writer -> encode_manifest(Manifest) -> bytes on disk -> decode_manifest(bytes) -> validate().
Pure: no files. Layout of the bytes: FORMAT.md §3. Every parse failure is a StoreFormatError subclass.
"""

from __future__ import annotations

import json
import re
from typing import Any

import xxhash

from zipmoe.errors import StoreVersionError
from zipmoe.store.format import (
    CORRUPT_HINT,
    FORMAT_VERSION,
    MAX_INT,
    MAX_MANIFEST_BYTES,
    ExpertEntry,
    FieldTypeError,
    FileRecord,
    Manifest,
    ManifestChecksumError,
    ManifestSyntaxError,
    ManifestTooLargeError,
    MissingFieldError,
    TensorSpec,
    UnknownFieldError,
)
from zipmoe.store.format import FORMAT_MINOR as _MINOR
from zipmoe.types import ChunkRef, ExpertKey

_PREFIX = '{"xxh3_64": "%s", "manifest": '
PREFIX_LEN = len(_PREFIX % ("0" * 16))  # the self-checksum covers every byte after this prefix
_PREFIX_RE = re.compile(rb'\{"xxh3_64": "([0-9a-f]{16})", "manifest": ')
_HEX_RE = re.compile(r"[0-9a-f]{16}")


def encode_manifest(m: Manifest) -> bytes:
    """Deterministic bytes of zipmoe.json: one top-level field per line, one expert per line."""
    top: list[tuple[str, Any]] = [
        ("format_version", m.format_version),
        ("format_minor", m.format_minor),
        ("model_type", m.model_type),
        ("codec", {"id": m.codec_id, "params": dict(m.codec_params)}),
        ("k", m.k),
        ("metadata", dict(m.metadata)),
        ("dense_files", list(m.dense_files)),
        ("files", {n: {"size": r.size, "xxh3_64": _hex(r.checksum)} for n, r in sorted(m.files.items())}),
    ]
    lines = [f" {json.dumps(k)}: {compact_json(v)}" for k, v in top]
    experts = ",\n  ".join(compact_json(expert_to_json(e), sort_keys=False) for e in m.experts)
    lines.append(f' "experts": [\n  {experts}\n ]' if experts else ' "experts": []')
    tail = ("{\n" + ",\n".join(lines) + "\n}}\n").encode("ascii")
    return (_PREFIX % _hex(xxhash.xxh3_64_intdigest(tail))).encode("ascii") + tail


def decode_manifest(data: bytes) -> Manifest:
    """Parse and self-verify zipmoe.json bytes; raise the StoreFormatError subclass naming the problem."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestTooLargeError(
            f"store manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES}-byte cap — {CORRUPT_HINT}"
        )
    match = _PREFIX_RE.match(data)
    if match is None:
        raise ManifestSyntaxError(f"store manifest does not start with the zipmoe envelope — {CORRUPT_HINT}")
    if int(match.group(1), 16) != xxhash.xxh3_64_intdigest(data[PREFIX_LEN:]):
        raise ManifestChecksumError(f"store manifest zipmoe.json: checksum mismatch — {CORRUPT_HINT}")
    try:
        outer = json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise ManifestSyntaxError(f"store manifest is not valid JSON ({exc}) — {CORRUPT_HINT}") from None
    envelope = _Obj(outer, "envelope", lenient=False)
    envelope.take("xxh3_64", str)
    body = envelope.take("manifest", dict)
    envelope.done()
    return _manifest(body)


def _manifest(body: dict) -> Manifest:
    version = body.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise StoreVersionError(
            f"store format version {version} is newer than this zipmoe reads ({FORMAT_VERSION})"
            " — upgrade zipmoe, or re-convert the model with this version"
        )
    minor = body.get("format_minor")
    obj = _Obj(
        body, "manifest", lenient=isinstance(minor, int) and version == FORMAT_VERSION and minor > _MINOR
    )
    version, minor = obj.int_("format_version", lo=1), obj.int_("format_minor")
    model_type = obj.take("model_type", str)
    codec = _Obj(obj.take("codec", dict), "codec", obj.lenient)
    codec_id, params = codec.take("id", str), codec.take("params", dict)
    codec.done()
    k = obj.int_("k", lo=1)
    metadata = obj.take("metadata", dict)
    if not all(isinstance(v, str) for v in metadata.values()):
        raise _type_error("metadata", "values must be strings")
    dense = obj.take("dense_files", list)
    if not all(isinstance(v, str) for v in dense):
        raise _type_error("dense_files", "entries must be strings")
    files = {name: _file_record(rec, name, obj.lenient) for name, rec in obj.take("files", dict).items()}
    experts = tuple(expert_from_json(e, i, obj.lenient) for i, e in enumerate(obj.take("experts", list)))
    obj.done()
    return Manifest(
        codec_id=codec_id,
        codec_params=params,
        k=k,
        model_type=model_type,
        experts=experts,
        files=files,
        dense_files=tuple(dense),
        metadata=metadata,
        format_version=version,
        format_minor=minor,
    )


def _file_record(value: Any, name: str, lenient: bool) -> FileRecord:
    obj = _Obj(value, f"file {name!r}", lenient)
    record = FileRecord(size=obj.int_("size"), checksum=obj.hex_("xxh3_64"))
    obj.done()
    return record


def expert_from_json(value: Any, index: int, lenient: bool = False) -> ExpertEntry:
    """Parse one expert entry (the `index`-th) strictly; no cross-field checks (validate() does those)."""
    obj = _Obj(value, f"expert entry #{index}", lenient)
    key = ExpertKey(obj.int_("layer"), obj.int_("expert"))
    obj.where = str(key)
    mode, numel = obj.take("mode", str), obj.int_("numel")
    tensors = tuple(
        _tensor(t, f"{key} tensor #{i}", lenient) for i, t in enumerate(obj.take("tensors", list))
    )
    sm = _chunk(obj.take("sm", dict), f"{key} SM plane", lenient)
    shards = tuple(_chunk(c, f"{key} E-shard {i}", lenient) for i, c in enumerate(obj.take("e_shards", list)))
    bounds = tuple(_pair(b, f"{key} shard_bounds[{i}]") for i, b in enumerate(obj.take("shard_bounds", list)))
    obj.done()
    return ExpertEntry(
        key=key, mode=mode, tensors=tensors, numel=numel, sm=sm, e_shards=shards, shard_bounds=bounds
    )


def _tensor(value: Any, where: str, lenient: bool) -> TensorSpec:
    obj = _Obj(value, where, lenient)
    name, hf_name = obj.take("name", str), obj.take("hf_name", str)
    shape = obj.take("shape", list)
    if not all(_is_int(d) and 0 <= d <= MAX_INT for d in shape):
        raise _type_error(where, f"shape {shape!r} must be non-negative integers")
    spec = TensorSpec(
        name=name,
        hf_name=hf_name,
        shape=tuple(shape),
        dtype=obj.take("dtype", str),
        offset=obj.int_("offset"),
        numel=obj.int_("numel"),
        checksum=obj.hex_("xxh3_64"),
    )
    obj.done()
    return spec


def _chunk(value: Any, where: str, lenient: bool) -> ChunkRef:
    obj = _Obj(value, where, lenient)
    chunk = ChunkRef(
        offset=obj.int_("offset"),
        length=obj.int_("length"),
        raw_length=obj.int_("raw_length"),
        checksum=obj.hex_("xxh3_64"),
        codec=obj.take("codec", str),
    )
    obj.done()
    return chunk


def _pair(value: Any, where: str) -> tuple[int, int]:
    if not (
        isinstance(value, list) and len(value) == 2 and all(_is_int(v) and 0 <= v <= MAX_INT for v in value)
    ):
        raise _type_error(where, f"{value!r} must be [lo, hi] non-negative integers")
    return value[0], value[1]


def expert_to_json(e: ExpertEntry) -> dict[str, Any]:
    """One expert entry as the JSON object FORMAT.md §3 defines."""
    return {
        "layer": e.key.layer,
        "expert": e.key.expert,
        "mode": e.mode,
        "numel": e.numel,
        "tensors": [
            {
                "name": t.name,
                "hf_name": t.hf_name,
                "shape": list(t.shape),
                "dtype": t.dtype,
                "offset": t.offset,
                "numel": t.numel,
                "xxh3_64": _hex(t.checksum),
            }
            for t in e.tensors
        ],
        "sm": _chunk_obj(e.sm),
        "e_shards": [_chunk_obj(c) for c in e.e_shards],
        "shard_bounds": [list(b) for b in e.shard_bounds],
    }


def _chunk_obj(c: ChunkRef) -> dict[str, Any]:
    return {
        "offset": c.offset,
        "length": c.length,
        "raw_length": c.raw_length,
        "xxh3_64": _hex(c.checksum),
        "codec": c.codec,
    }


class _Obj:
    """A JSON object read field by field; fields left over at done() are unknown (FORMAT.md §5)."""

    def __init__(self, value: Any, where: str, lenient: bool):
        if not isinstance(value, dict):
            raise _type_error(where, f"expected a JSON object, got {type(value).__name__}")
        self.fields, self.where, self.lenient = dict(value), where, lenient

    def take(self, key: str, kind: type) -> Any:
        if key not in self.fields:
            raise MissingFieldError(
                f"store manifest: {self.where}: required field {key!r} is missing — {CORRUPT_HINT}"
            )
        value = self.fields.pop(key)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise _type_error(f"{self.where} field {key!r}", f"expected {kind.__name__}, got {value!r:.60}")
        return value

    def int_(self, key: str, lo: int = 0) -> int:
        value = self.take(key, int)
        if not lo <= value <= MAX_INT:
            raise _type_error(f"{self.where} field {key!r}", f"{value} is outside [{lo}, 2**63-1]")
        return value

    def hex_(self, key: str) -> int:
        value = self.take(key, str)
        if not _HEX_RE.fullmatch(value):
            raise _type_error(f"{self.where} field {key!r}", f"{value!r:.60} is not 16 lowercase hex digits")
        return int(value, 16)

    def done(self) -> None:
        if self.fields and not self.lenient:
            raise UnknownFieldError(
                f"store manifest: {self.where}: unknown field(s) {sorted(self.fields)!r:.200}"
                f" for format {FORMAT_VERSION}.{_MINOR} — {CORRUPT_HINT}"
            )


def _type_error(where: str, what: str) -> FieldTypeError:
    return FieldTypeError(f"store manifest: {where}: {what} — {CORRUPT_HINT}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _hex(n: int) -> str:
    return f"{n:016x}"


def compact_json(v: Any, sort_keys: bool = True) -> str:
    """One-line deterministic JSON (ASCII, no NaN)."""
    return json.dumps(v, separators=(",", ":"), sort_keys=sort_keys, ensure_ascii=True, allow_nan=False)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in an object")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")
