"""Round trip: the writer's input comes back bit-exactly, deterministically, via O_DIRECT or buffered I/O."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import safetensors
import xxhash
from store_helpers import (
    CONFIG,
    build_store,
    decode_expert,
    dense_tensors,
    fake_experts,
    store_files,
)

from zipmoe.errors import ZipMoEError
from zipmoe.store import StoreReader, aligned_buffer, open_direct, read_direct_into
from zipmoe.store.format import ALIGN, FORMAT_VERSION

GOLDEN = Path(__file__).parent / "data" / "golden-v1"


def _read_all(reader: StoreReader, experts, codec: str = "zstd") -> None:
    """Every expert decodes to its original bits; every tensor matches its recorded checksum."""
    sm_buf, e_buf = reader.new_sm_buffer(), reader.new_e_buffer()
    for fx in experts:
        entry = reader.entries[fx.key]
        sm = reader.read_sm_into(entry, sm_buf)
        shards = reader.read_e_into(entry, e_buf)
        if fx.raw is not None:
            assert sm.tobytes() == fx.raw and shards == []
            values = np.frombuffer(sm, dtype=np.float32)
        else:
            values = decode_expert(fx, sm, shards, codec)
            assert np.array_equal(values, fx.u16)
        for t in entry.tensors:
            assert xxhash.xxh3_64_intdigest(values[t.offset : t.offset + t.numel].tobytes()) == t.checksum


def test_round_trip_is_bit_exact(pristine_store, experts):
    with StoreReader(pristine_store) as reader:
        m = reader.manifest
        assert (m.format_version, m.codec_id, dict(m.codec_params), m.k, m.model_type) == (
            FORMAT_VERSION,
            "zstd",
            {"level": 3},
            4,
            "qwen2_moe",
        )
        assert sorted(reader.entries) == [fx.key for fx in experts]
        assert reader.config == CONFIG
        _read_all(reader, experts)
        for entry in reader.entries.values():
            assert entry.sm.offset % ALIGN == 0 and entry.e_offset % ALIGN == 0
            assert [t.name for t in entry.tensors] == ["gate", "up", "down"]
        totals = reader.expert_bytes
        assert totals.original == sum(fx.u16.nbytes for fx in experts)
        assert totals.raw == len(experts[-1].raw) and totals.sm == 6 * experts[0].u16.size
        reader.verify_all()


def test_dense_tensors_and_files_are_bit_identical(pristine_store):
    with StoreReader(pristine_store) as reader:
        (dense,) = reader.dense_files()
        stored = dict(safetensors.deserialize(dense.read_bytes()))
        for name, (dtype, shape, data) in dense_tensors().items():
            assert stored[name]["dtype"] == {"bfloat16": "BF16", "float32": "F32"}[dtype]
            assert list(stored[name]["shape"]) == shape
            assert bytes(stored[name]["data"]) == data
        assert reader.file_path("tokenizer.json").read_text().startswith('{"version"')
        assert json.loads(reader.file_path("config.json").read_bytes()) == CONFIG


def test_writer_is_deterministic(tmp_path, pristine_store, experts):
    again = build_store(tmp_path / "again", experts)
    assert store_files(again) == store_files(pristine_store)


def test_golden_store_bytes_and_reads(tmp_path):
    """The v1 format is frozen: today's writer reproduces the committed store and today's reader reads it."""
    experts = fake_experts(layers=1, experts=2, k=2, codec="raw")
    built = build_store(tmp_path / "golden", experts, k=2, codec="raw")
    if os.environ.get("ZIPMOE_REGEN_GOLDEN"):
        shutil.rmtree(GOLDEN, ignore_errors=True)
        shutil.copytree(built, GOLDEN)
    assert store_files(built) == store_files(GOLDEN), (
        "store format drifted: bump format_version and regenerate"
    )
    with StoreReader(GOLDEN) as reader:
        _read_all(reader, experts, codec="raw")
        reader.verify_all()


def test_direct_and_buffered_reads_agree(pristine_store, experts):
    with (
        StoreReader(pristine_store, direct_io=True) as direct,
        StoreReader(pristine_store, direct_io=False) as buf,
    ):
        assert direct.direct and not buf.direct
        _read_all(direct, experts)
        _read_all(buf, experts)


def test_tmpfs_falls_back_to_buffered(pristine_store, experts, caplog):
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm tmpfs here")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        copy = Path(shm) / "store"
        shutil.copytree(pristine_store, copy)
        with caplog.at_level(logging.WARNING, logger="zipmoe.store.aligned"), StoreReader(copy) as reader:
            if reader.direct:
                pytest.skip("this tmpfs accepts O_DIRECT")
            _read_all(reader, experts)
        assert "O_DIRECT is not supported" in caplog.text
        with pytest.raises(ZipMoEError, match="O_DIRECT is not supported"):
            StoreReader(copy, direct_io=True)


def test_open_direct_falls_back_when_refused(pristine_store, experts, monkeypatch, caplog):
    """File systems that refuse O_DIRECT at open() (EINVAL) get buffered reads and one warning."""
    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    with (
        caplog.at_level(logging.WARNING, logger="zipmoe.store.aligned"),
        StoreReader(pristine_store) as reader,
    ):
        assert not reader.direct
        _read_all(reader, experts)
    assert "O_DIRECT is not supported" in caplog.text
    with pytest.raises(ZipMoEError, match="O_DIRECT is not supported"):
        StoreReader(pristine_store, direct_io=True)


def test_concurrent_reads_from_threads(pristine_store, experts):
    with StoreReader(pristine_store) as reader:

        def work(_: int) -> None:
            _read_all(reader, experts)  # each call allocates its own buffers: one per worker thread

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(work, range(8)))


def test_read_direct_into_unaligned_span(pristine_store):
    data = (pristine_store / "experts.bin").read_bytes()
    fd, direct = open_direct(pristine_store / "experts.bin")
    try:
        buf = aligned_buffer(3 * ALIGN)
        assert buf.ctypes.data % ALIGN == 0 and buf.nbytes == 3 * ALIGN
        for offset, length in [(0, 1), (1, 4095), (4095, 2), (5000, 7000), (len(data) - 3, 3)]:
            assert read_direct_into(fd, offset, length, buf).tobytes() == data[offset : offset + length]
        with pytest.raises(EOFError):
            read_direct_into(fd, len(data) - 2, 4, buf)
        with pytest.raises(ValueError, match="buffer"):
            read_direct_into(fd, 0, 2 * ALIGN + 1, aligned_buffer(ALIGN))
        if direct:
            with pytest.raises(ValueError, match="page-aligned"):
                read_direct_into(fd, 0, 16, aligned_buffer(3 * ALIGN)[1 : 2 * ALIGN + 1])
    finally:
        os.close(fd)


def test_reader_closes_its_descriptor(pristine_store):
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with StoreReader(pristine_store):
            pass
        StoreReader(pristine_store).close()
    reader = StoreReader(pristine_store)
    del reader  # weakref.finalize closes a forgotten reader
    assert len(os.listdir("/proc/self/fd")) == before
    closed = StoreReader(pristine_store)
    closed.close()
    closed.close()
    with pytest.raises(ZipMoEError, match="closed"):
        closed.read_sm_into(next(iter(closed.entries.values())), closed.new_sm_buffer())
