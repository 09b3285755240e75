"""Corruption: flipped bytes, truncation, deleted files are detected with an error naming the chunk or file;
fuzzed stores make the reader raise only ZipMoEError subclasses, never compute with wrong bytes."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zipmoe.errors import ChecksumError, StoreFormatError, StoreIncompleteError, ZipMoEError
from zipmoe.store import format as fmt
from zipmoe.store.manifest_json import PREFIX_LEN
from zipmoe.store.reader import StoreReader


def flip(path: Path, pos: int, bit: int = 0x10) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ bit]))


def read_everything(reader: StoreReader) -> None:
    sm_buf, e_buf = reader.new_sm_buffer(), reader.new_e_buffer()
    for entry in reader.entries.values():
        reader.read_sm_into(entry, sm_buf)
        reader.read_e_into(entry, e_buf)


def chunk_at(reader: StoreReader, pos: int):
    """(entry, plane name) of the chunk holding byte `pos` of experts.bin, or None for padding."""
    for entry in reader.entries.values():
        chunks = [("SM plane" if entry.mode == "split" else "raw data", entry.sm)]
        chunks += [(f"E-shard {i}", c) for i, c in enumerate(entry.e_shards)]
        for plane, c in chunks:
            if c.offset <= pos < c.offset + c.length:
                return entry, plane
    return None


def sample_positions(reader: StoreReader, size: int) -> list[int]:
    """First, middle and last byte of every chunk, bytes either side of every region, and random bytes."""
    spots = set()
    for entry in reader.entries.values():
        for c in (entry.sm, *entry.e_shards):
            spots |= {c.offset, c.offset + c.length // 2, c.offset + c.length - 1, c.offset + c.length}
        spots.add(entry.sm.offset - 1)
    spots |= set(random.Random(0).sample(range(size), 60)) | {size - 1}
    return sorted(p for p in spots if 0 <= p < size)


def test_every_sampled_data_byte_flip_is_detected(store):
    data_path = store / "experts.bin"
    with StoreReader(store) as reader:
        positions = sample_positions(reader, data_path.stat().st_size)
    padding_seen = chunk_seen = 0
    for pos in positions:
        flip(data_path, pos)
        with StoreReader(store) as reader:
            hit = chunk_at(reader, pos)
            if hit is not None:
                entry, plane = hit
                with pytest.raises(
                    ChecksumError,
                    match=f"{entry.key} {plane} at offset .*checksum mismatch — the store "
                    "is corrupt; re-run zipmoe convert",
                ):
                    read_everything(reader)
                chunk_seen += 1
            with pytest.raises(ChecksumError, match=(f"{hit[0].key} {hit[1]}" if hit else "padding")):
                reader.verify_all()
            padding_seen += hit is None
        flip(data_path, pos)
    assert chunk_seen > 50 and padding_seen > 10
    with StoreReader(store) as reader:
        read_everything(reader)
        reader.verify_all()


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_flipped_bytes_in_other_files_are_detected(store, name):
    path = store / name
    for pos in sorted({0, 1, path.stat().st_size // 2, path.stat().st_size - 1}):
        flip(path, pos)
        if name == "model.safetensors":  # big files are checked when used, and by verify_all
            with StoreReader(store) as reader, pytest.raises(ChecksumError, match=name):
                reader.dense_files()
            with StoreReader(store) as reader, pytest.raises(ChecksumError, match=name):
                reader.verify_all()
        else:  # small files are checked at open
            with pytest.raises(ChecksumError, match=name):
                StoreReader(store)
        flip(path, pos)
    StoreReader(store).close()


@pytest.mark.parametrize("cut", [1, 4096, 10_000, None])
def test_truncated_data_file_is_detected(store, cut):
    path = store / "experts.bin"
    size = path.stat().st_size
    os.truncate(path, 0 if cut is None else size - cut)
    with pytest.raises(fmt.DataFileSizeError, match=r"experts\.bin"):
        StoreReader(store)


def test_truncation_while_open_is_detected_on_read(store):
    with StoreReader(store) as reader:
        os.truncate(store / "experts.bin", 4096)
        with pytest.raises(fmt.DataFileSizeError, match="layer 0 expert 1 SM plane"):
            reader.read_sm_into(reader.entries[sorted(reader.entries)[1]], reader.new_sm_buffer())


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "zipmoe.json"])
def test_truncated_other_files_are_detected(store, name):
    path = store / name
    os.truncate(path, path.stat().st_size - 1)
    with pytest.raises(StoreFormatError, match="zipmoe.json|checksum" if name == "zipmoe.json" else name):
        StoreReader(store)


@pytest.mark.parametrize(
    "name", ["experts.bin", "model.safetensors", "config.json", "tokenizer.json", "zipmoe.json"]
)
def test_deleted_file_is_detected(store, name):
    (store / name).unlink()
    with pytest.raises(StoreIncompleteError, match=name):
        StoreReader(store)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreIncompleteError, match="not a zipmoe store"):
        StoreReader(tmp_path / "missing")
    with pytest.raises(StoreIncompleteError, match=r"no zipmoe\.json"):
        StoreReader(tmp_path)


# ---- fuzzing: the reader never crashes with anything but a ZipMoEError ----
@pytest.fixture(scope="module")
def fuzz_store(pristine_store):
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "store"
        shutil.copytree(pristine_store, dest)
        yield dest


def exercise(store: Path) -> None:
    """Open, read every expert and verify every file; only ZipMoEError may come out."""
    with StoreReader(store) as reader:
        read_everything(reader)
        reader.dense_files()
        _ = reader.expert_bytes
        reader.verify_all()


FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), min_size=1, max_size=4))
def test_fuzz_data_file_edits_never_pass_silently(fuzz_store, edits):
    path = fuzz_store / "experts.bin"
    original = path.read_bytes()
    changed = bytearray(original)
    for pos, xor in edits:
        changed[pos % len(changed)] ^= xor
    path.write_bytes(changed)
    try:
        if bytes(changed) != original:
            with pytest.raises(ChecksumError):
                exercise(fuzz_store)
    finally:
        path.write_bytes(original)


def json_values():
    leaf = (
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=False)
        | st.text(max_size=6)
        | st.sampled_from(["raw", "zstd", "bfloat16", "split", "0" * 16, "config.json"])
    )
    return st.recursive(
        leaf,
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
        max_leaves=6,
    )


def mutate(node, data):
    """Replace, tweak or delete one randomly chosen place in a JSON tree (returns the new tree)."""
    if isinstance(node, dict | list) and node and data.draw(st.integers(0, 7)) > 0:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = data.draw(st.sampled_from(keys))
        action = data.draw(st.integers(0, 9))
        if action == 0:
            del node[key]
        else:
            node[key] = mutate(node[key], data)
        return node
    if isinstance(node, int) and not isinstance(node, bool) and data.draw(st.integers(0, 3)) > 0:
        return node + data.draw(st.integers(-5000, 5000) | st.sampled_from([-1, 1, 4096, -4096]))
    return data.draw(json_values())


def reseal(body: dict) -> bytes:
    tail = (json.dumps(body) + "}\n").encode()
    return b'{"xxh3_64": "%016x", "manifest": ' % xxhash.xxh3_64_intdigest(tail) + tail


@FUZZ
@given(data=st.data())
def test_fuzz_manifest_structure_only_raises_zipmoe_errors(fuzz_store, data):
    path = fuzz_store / "zipmoe.json"
    original = path.read_bytes()
    body = json.loads(original)["manifest"]
    path.write_bytes(reseal(mutate(body, data)))
    try:
        exercise(fuzz_store)
    except ZipMoEError:
        pass
    finally:
        path.write_bytes(original)


def int_paths(node, path=()):
    """Paths to every integer leaf of a JSON tree."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in int_paths(v, (*path, k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in int_paths(v, (*path, i))]
    return [path] if isinstance(node, int) and not isinstance(node, bool) else []


@FUZZ
@given(data=st.data())
def test_fuzz_manifest_numbers_only_raise_zipmoe_errors(fuzz_store, data):
    """Off-by-one and off-by-a-page offsets, lengths, bounds, sizes: reaches the validator's arithmetic."""
    path = fuzz_store / "zipmoe.json"
    original = path.read_bytes()
    body = json.loads(original)["manifest"]
    for _ in range(data.draw(st.integers(1, 2))):
        *parents, last = data.draw(st.sampled_from(int_paths(body)))
        node = body
        for key in parents:
            node = node[key]
        node[last] += data.draw(st.sampled_from([-4096, -1, 1, 4096, 2**62]) | st.integers(-(10**6), 10**6))
    path.write_bytes(reseal(body))
    try:
        exercise(fuzz_store)  # may pass: a different but consistent layer number, a newer format_minor
    except ZipMoEError:
        pass
    finally:
        path.write_bytes(original)


@FUZZ
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 10**9), st.binary(min_size=0, max_size=3)), min_size=1, max_size=3
    )
)
def test_fuzz_manifest_bytes_only_raise_zipmoe_errors(fuzz_store, edits):
    path = fuzz_store / "zipmoe.json"
    original = path.read_bytes()
    tail = bytearray(original[PREFIX_LEN:])
    for pos, new in edits:
        pos %= len(tail)
        tail[pos : pos + 1] = new
    data = b'{"xxh3_64": "%016x", "manifest": ' % xxhash.xxh3_64_intdigest(tail) + bytes(tail)
    path.write_bytes(data)
    try:
        exercise(fuzz_store)
    except ZipMoEError:
        pass
    finally:
        path.write_bytes(original)
