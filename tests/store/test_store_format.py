"""The manifest: a hand-made broken manifest per error class, strict JSON rules, versioning, size cap."""

from __future__ import annotations

import inspect
import json
from dataclasses import replace

import pytest
import xxhash

from zipmoe.errors import StoreFormatError, StoreVersionError
from zipmoe.store import format as fmt
from zipmoe.store import manifest_json, reader
from zipmoe.store.format import Manifest, validate
from zipmoe.store.manifest_json import PREFIX_LEN, decode_manifest, encode_manifest
from zipmoe.store.reader import StoreReader


@pytest.fixture(scope="module")
def base(pristine_store) -> tuple[Manifest, int]:
    return decode_manifest((pristine_store / "zipmoe.json").read_bytes()), (
        pristine_store / "experts.bin"
    ).stat().st_size


def seal(body: dict | str) -> bytes:
    """zipmoe.json bytes with a correct self-checksum around any body (to get past the checksum gate)."""
    tail = ((body if isinstance(body, str) else json.dumps(body)) + "}\n").encode()
    return b'{"xxh3_64": "%016x", "manifest": ' % xxhash.xxh3_64_intdigest(tail) + tail


def body_of(m: Manifest) -> dict:
    return json.loads(encode_manifest(m))["manifest"]


def edit_expert(m: Manifest, i: int, **kw) -> Manifest:
    experts = list(m.experts)
    experts[i] = replace(experts[i], **kw)
    return replace(m, experts=tuple(experts))


def edit_chunk(m: Manifest, i: int, shard: int | None, **kw) -> Manifest:
    e = m.experts[i]
    if shard is None:
        return edit_expert(m, i, sm=replace(e.sm, **kw))
    shards = list(e.e_shards)
    shards[shard] = replace(shards[shard], **kw)
    return edit_expert(m, i, e_shards=tuple(shards))


def edit_tensor(m: Manifest, i: int, t: int, **kw) -> Manifest:
    tensors = list(m.experts[i].tensors)
    tensors[t] = replace(tensors[t], **kw)
    return edit_expert(m, i, tensors=tuple(tensors))


def resize(m: Manifest, size: int) -> Manifest:
    files = dict(m.files)
    files["experts.bin"] = replace(files["experts.bin"], size=size)
    return replace(m, files=files)


# case -> (error class, breaker: (manifest, data size) -> (manifest, size), words the message must name)
LAYOUT_CASES = {
    "file-size": (fmt.DataFileSizeError, lambda m, n: (m, n + 4096), "experts.bin"),
    "not-covered": (fmt.DataFileSizeError, lambda m, n: (resize(m, n + 4096), n + 4096), "experts.bin"),
    "duplicate": (
        fmt.UnsortedExpertsError,
        lambda m, n: (replace(m, experts=(m.experts[0],) * 2), n),
        "layer 0 expert 0",
    ),
    "tensor-offset": (
        fmt.TensorLayoutError,
        lambda m, n: (edit_tensor(m, 1, 1, offset=7), n),
        "layer 0 expert 1 tensor 'up'",
    ),
    "tensor-shape": (
        fmt.TensorLayoutError,
        lambda m, n: (edit_tensor(m, 1, 2, shape=(3, 3)), n),
        "tensor 'down'",
    ),
    "tensor-dtype": (fmt.TensorLayoutError, lambda m, n: (edit_tensor(m, 0, 0, dtype="float16"), n), "dtype"),
    "shard-count": (
        fmt.ShardCountError,
        lambda m, n: (edit_expert(m, 2, e_shards=m.experts[2].e_shards[:3]), n),
        "K is 4",
    ),
    "raw-shards": (
        fmt.ShardCountError,
        lambda m, n: (edit_expert(m, 6, shard_bounds=((0, 1),)), n),
        "layer 2 expert 0",
    ),
    "shard-bounds": (
        fmt.ShardBoundsError,
        lambda m, n: (
            edit_expert(m, 3, shard_bounds=((0, 1728), (1729, 3456), (3456, 5184), (5184, 6912))),
            n,
        ),
        "layer 1 expert 0 E-shard 1",
    ),
    "sm-length": (fmt.ChunkLengthError, lambda m, n: (edit_chunk(m, 0, None, length=6911), n), "SM plane"),
    "e-raw-length": (fmt.ChunkLengthError, lambda m, n: (edit_chunk(m, 4, 2, raw_length=5), n), "E-shard 2"),
    "zero-length": (fmt.ChunkLengthError, lambda m, n: (edit_chunk(m, 4, 3, length=0), n), "E-shard 3"),
    "codec": (
        fmt.UnknownCodecError,
        lambda m, n: (edit_chunk(m, 5, 0, codec="lz4"), n),
        "layer 1 expert 2 E-shard 0",
    ),
    "misaligned": (
        fmt.MisalignedChunkError,
        lambda m, n: (edit_chunk(m, 1, None, offset=m.experts[1].sm.offset + 8), n),
        "layer 0 expert 1 SM plane",
    ),
    "overlap": (
        fmt.OverlappingChunksError,
        lambda m, n: (edit_chunk(m, 1, None, offset=m.experts[0].e_offset), n),
        "layer 0 expert 1 SM plane",
    ),
    "gap": (
        fmt.LayoutGapError,
        lambda m, n: (edit_chunk(m, 1, None, offset=m.experts[1].sm.offset + 4096), n),
        "hole",
    ),
    "shard-gap": (
        fmt.LayoutGapError,
        lambda m, n: (edit_chunk(m, 0, 1, offset=m.experts[0].e_shards[1].offset + 1), n),
        "E-shard 1",
    ),
    "out-of-file": (
        fmt.ChunkOutOfBoundsError,
        lambda m, n: (resize(m, n - 4096), n - 4096),
        "layer 2 expert 0 raw data",
    ),
    "no-config": (
        fmt.MissingFileError,
        lambda m, n: (replace(m, files={k: v for k, v in m.files.items() if k != "config.json"}), n),
        "config.json",
    ),
    "bad-name": (
        fmt.BadFileNameError,
        lambda m, n: (replace(m, files={**m.files, "../evil": m.files["config.json"]}), n),
        "../evil",
    ),
    "dense-unlisted": (
        fmt.BadFileNameError,
        lambda m, n: (replace(m, dense_files=("x.safetensors",)), n),
        "x.safetensors",
    ),
    "k-zero": (fmt.FieldTypeError, lambda m, n: (replace(m, k=0), n), "k=0"),
}


@pytest.mark.parametrize("case", sorted(LAYOUT_CASES))
def test_each_broken_invariant_has_its_error(base, case):
    cls, breaker, words = LAYOUT_CASES[case]
    manifest, size = breaker(*base)
    with pytest.raises(cls) as info:
        validate(manifest, size)
    assert type(info.value) is cls
    assert words in str(info.value) and "re-run zipmoe convert" in str(info.value)


def test_every_error_class_is_exercised():
    """Adding an error class to format.py without a hand-made case here fails."""
    classes = {
        c
        for _, c in inspect.getmembers(fmt, inspect.isclass)
        if issubclass(c, StoreFormatError) and c.__module__ == fmt.__name__
    }
    covered = {c for c, _, _ in LAYOUT_CASES.values()} | set(JSON_CASES_CLASSES)
    assert classes - covered == set()


def test_valid_manifest_round_trips(base, pristine_store):
    m, size = base
    validate(m, size)
    data = encode_manifest(m)
    assert decode_manifest(data) == m
    assert data == (pristine_store / "zipmoe.json").read_bytes()


def test_every_manifest_byte_flip_is_detected(pristine_store):
    data = (pristine_store / "zipmoe.json").read_bytes()
    for i in range(len(data)):
        for bit in (0x01, 0x40):
            broken = bytearray(data)
            broken[i] ^= bit
            with pytest.raises(StoreFormatError):
                decode_manifest(bytes(broken))


def test_truncated_manifest_is_detected(pristine_store):
    data = (pristine_store / "zipmoe.json").read_bytes()
    for n in (0, 10, PREFIX_LEN, PREFIX_LEN + 1, len(data) // 2, len(data) - 1):
        with pytest.raises(StoreFormatError):
            decode_manifest(data[:n])


JSON_CASES_CLASSES = (
    fmt.ManifestSyntaxError,
    fmt.ManifestChecksumError,
    fmt.MissingFieldError,
    fmt.UnknownFieldError,
    fmt.ManifestTooLargeError,
    fmt.FileSizeError,
)


def test_json_rules(base):
    body = body_of(base[0])
    assert decode_manifest(seal(body)) == base[0]
    with pytest.raises(fmt.ManifestSyntaxError, match="envelope"):
        decode_manifest(b'{"manifest": {}}')
    with pytest.raises(fmt.ManifestChecksumError, match="checksum mismatch"):
        decode_manifest(seal(body)[:-3] + b"}\n\n")
    with pytest.raises(fmt.ManifestSyntaxError, match="not valid JSON"):
        decode_manifest(seal('{"k": 1, "k": 2}'))
    with pytest.raises(fmt.ManifestSyntaxError, match="NaN"):
        decode_manifest(seal('{"k": NaN}'))
    for key, value, cls in [
        ("k", "4", fmt.FieldTypeError),
        ("k", True, fmt.FieldTypeError),
        ("k", 2**63, fmt.FieldTypeError),
        ("experts", {}, fmt.FieldTypeError),
        ("surprise", 1, fmt.UnknownFieldError),
    ]:
        with pytest.raises(cls, match=key):
            decode_manifest(seal({**body, key: value}))
    del body["model_type"]
    with pytest.raises(fmt.MissingFieldError, match="model_type"):
        decode_manifest(seal(body))


def test_nested_unknown_and_missing_fields(base):
    body = body_of(base[0])
    body["experts"][1]["e_shards"][2]["extra"] = 0
    with pytest.raises(fmt.UnknownFieldError, match="layer 0 expert 1 E-shard 2"):
        decode_manifest(seal(body))
    body = body_of(base[0])
    del body["experts"][3]["tensors"][0]["xxh3_64"]
    with pytest.raises(fmt.MissingFieldError, match="layer 1 expert 0 tensor #0"):
        decode_manifest(seal(body))
    body = body_of(base[0])
    body["experts"][0]["sm"]["xxh3_64"] = "XYZ"
    with pytest.raises(fmt.FieldTypeError, match="hex"):
        decode_manifest(seal(body))


def test_versioning(base):
    body = body_of(base[0])
    with pytest.raises(StoreVersionError, match="newer"):
        decode_manifest(seal({**body, "format_version": fmt.FORMAT_VERSION + 1, "new_thing": 1}))
    newer_minor = {**body, "format_minor": fmt.FORMAT_MINOR + 1, "optional_extra": {"a": 1}}
    newer_minor["experts"][0]["hint"] = "ignored by older readers"
    assert decode_manifest(seal(newer_minor)).experts == base[0].experts
    with pytest.raises(fmt.FieldTypeError, match="format_version"):
        decode_manifest(seal({**body, "format_version": 0}))


def test_header_size_cap(store, monkeypatch):
    monkeypatch.setattr(manifest_json, "MAX_MANIFEST_BYTES", 1000)
    with pytest.raises(fmt.ManifestTooLargeError, match="cap"):
        decode_manifest((store / "zipmoe.json").read_bytes())
    monkeypatch.setattr(reader, "MAX_MANIFEST_BYTES", 1000)
    with pytest.raises(fmt.ManifestTooLargeError, match="cap"):
        StoreReader(store)


def test_file_size_mismatch_names_the_file(store):
    with open(store / "model.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(fmt.FileSizeError, match=r"model\.safetensors"):
        StoreReader(store)
