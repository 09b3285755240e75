"""Writer: atomic install, interrupted writes (abandoned and kill -9) never load and resume to the same bytes,
destination rules, bad input and OS errors (read-only, full disk) as ConversionError."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from store_helpers import add_experts, add_rest, build_store, fake_experts, store_files

from zipmoe.errors import ConversionError, StoreIncompleteError
from zipmoe.store import writer as writer_mod
from zipmoe.store.format import JOURNAL_NAME
from zipmoe.store.reader import StoreReader
from zipmoe.store.writer import TMP_SUFFIX, StoreWriter
from zipmoe.types import ExpertKey

HERE = Path(__file__).parent


def new_writer(dest: Path, **kw) -> StoreWriter:
    return StoreWriter(
        dest,
        codec_id="zstd",
        codec_params={"level": 3},
        k=4,
        model_type="qwen2_moe",
        metadata={"source": "tests"},
        **kw,
    )


def tmp_of(dest: Path) -> Path:
    return dest.with_name(dest.name + TMP_SUFFIX)


def assert_not_loadable(*paths: Path) -> None:
    for path in paths:
        with pytest.raises(StoreIncompleteError):
            StoreReader(path)


def test_abandoned_writer_never_loads_and_rerun_resumes(tmp_path, experts, pristine_store):
    dest = tmp_path / "store"
    w = new_writer(dest)
    add_experts(w, experts[:4])
    w.close()  # the process "dies" before finalize
    assert not dest.exists()
    assert_not_loadable(dest, tmp_of(dest))
    w = new_writer(dest)
    assert w.completed == {fx.key for fx in experts[:4]}
    add_experts(w, experts)  # a converter may re-add everything: stored experts are checked and skipped
    add_rest(w, tmp_path)
    w.finalize()
    assert not tmp_of(dest).exists()
    assert store_files(dest) == store_files(pristine_store)  # resumed == written in one go, byte for byte


def test_a_failing_check_installs_nothing_and_leaves_no_manifest(tmp_path, experts):
    dest = tmp_path / "store"
    w = new_writer(dest)
    add_experts(w, experts)
    add_rest(w, tmp_path)
    seen: list[Path] = []

    def check(tmp: Path) -> None:
        seen.append(tmp)
        StoreReader(tmp).close()  # the finished temp store is complete when the check runs
        raise ConversionError("simulated: the re-read found a bad chunk")

    with pytest.raises(ConversionError, match="simulated"):
        w.finalize(check=check)
    assert seen == [tmp_of(dest)] and not dest.exists()
    assert_not_loadable(tmp_of(dest))


def test_resume_drops_experts_whose_bytes_no_longer_verify(tmp_path, experts, pristine_store):
    dest = tmp_path / "store"
    w = new_writer(dest)
    add_experts(w, experts[:4])
    third = w._by_key[experts[2].key]
    w.close()
    data = tmp_of(dest) / "experts.bin"
    with open(data, "r+b") as f:  # corrupt the third expert's last E-shard
        f.seek(third.e_shards[-1].offset)
        f.write(b"\xff\xff")
    w = new_writer(dest)
    assert w.completed == {fx.key for fx in experts[:2]}
    add_experts(w, experts[2:])
    add_rest(w, tmp_path)
    w.finalize()
    assert store_files(dest) == store_files(pristine_store)


def test_resume_with_other_parameters_restarts(tmp_path, experts):
    dest = tmp_path / "store"
    w = new_writer(dest)
    add_experts(w, experts[:3])
    w.close()
    w = StoreWriter(dest, codec_id="zstd", codec_params={"level": 19}, k=4, model_type="qwen2_moe")
    assert w.completed == frozenset()
    w.discard()
    assert not tmp_of(dest).exists()


def test_changed_input_on_resume_is_refused(tmp_path, experts):
    dest = tmp_path / "store"
    w = new_writer(dest)
    add_experts(w, experts[:2])
    w.close()
    w = new_writer(dest)
    other = experts[3]  # layer 1's planes offered under layer 0's key
    with pytest.raises(ConversionError, match="input changed"):
        w.add_expert(experts[0].key, other.tensors, other.sm, other.shards, shard_bounds=other.bounds)
    w.close()


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from pathlib import Path
    from store_helpers import fake_experts, add_experts
    from zipmoe.store.writer import StoreWriter
    experts = fake_experts()
    w = StoreWriter(Path(sys.argv[1]), codec_id="zstd", codec_params={"level": 3}, k=4,
                    model_type="qwen2_moe", metadata={"source": "tests"})
    for i, fx in enumerate(experts):
        add_experts(w, [fx])
        if i == 3:
            print("HALFWAY", flush=True)
            time.sleep(60)  # killed here, with the data file and journal open
""")


def test_kill_9_mid_write_never_loads_and_rerun_completes(tmp_path, pristine_store):
    dest = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(dest), str(HERE)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "HALFWAY"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not dest.exists() and (tmp_of(dest) / JOURNAL_NAME).exists()
    assert_not_loadable(dest, tmp_of(dest))
    w = new_writer(dest)  # the killed process's lock died with it
    assert len(w.completed) == 4
    add_experts(w, fake_experts())
    add_rest(w, tmp_path)
    w.finalize()
    with StoreReader(dest) as reader:
        reader.verify_all()
    assert store_files(dest) == store_files(pristine_store)


def test_concurrent_writers_are_refused(tmp_path):
    w = new_writer(tmp_path / "store")
    with pytest.raises(ConversionError, match="another zipmoe conversion"):
        new_writer(tmp_path / "store")
    w.discard()


def test_destination_rules(tmp_path, experts):
    dest = build_store(tmp_path / "store", experts[:1])
    with pytest.raises(ConversionError, match=r"already holds a zipmoe store.*overwrite"):
        new_writer(dest)
    assert not tmp_of(dest).exists()
    build_store(dest, experts[:2], overwrite=True)
    with StoreReader(dest) as reader:
        assert len(reader.entries) == 2
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="not a zipmoe store; refusing"):
        new_writer(tmp_path / "data", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConversionError, match="not a directory"):
        new_writer(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    build_store(tmp_path / "empty", experts[:1])
    StoreReader(tmp_path / "empty").close()


def test_bad_input_is_a_conversion_error(tmp_path, experts):
    w = new_writer(tmp_path / "store")
    fx = experts[1]
    with pytest.raises(ConversionError, match="K is 4"):
        w.add_expert(fx.key, fx.tensors, fx.sm, fx.shards[:3], shard_bounds=fx.bounds[:3])
    with pytest.raises(ConversionError, match="SM plane"):
        w.add_expert(fx.key, fx.tensors, fx.sm[:-1], fx.shards, shard_bounds=fx.bounds)
    add_experts(w, [fx])
    with pytest.raises(ConversionError, match="sorted"):
        add_experts(w, [experts[0]])
    with pytest.raises(ConversionError, match=r"config\.json"):
        w.finalize()
    with pytest.raises(ConversionError, match="reserved or already used"):
        w.add_file_bytes("experts.bin", b"")
    with pytest.raises(ConversionError, match="plain relative"):
        w.add_file_bytes("../outside", b"")
    with pytest.raises(ConversionError, match="dense tensors"):
        w.add_dense_tensors({"x": ("bfloat16", [3], b"\0\0")})
    with pytest.raises(ConversionError, match="not a file"):
        w.copy_files([tmp_path / "missing.json"])
    w.discard()
    with pytest.raises(ConversionError, match="JSON"):
        StoreWriter(tmp_path / "s2", codec_id="zstd", k=4, model_type="x", codec_params={"level": object()})


def test_raw_experts_round_trip(tmp_path):
    raw = [fx for fx in fake_experts() if fx.raw is not None]
    dest = tmp_path / "store"
    w = StoreWriter(dest, codec_id="raw", k=1, model_type="mixtral")
    add_experts(w, raw)
    add_rest(w, tmp_path)
    w.finalize()
    with StoreReader(dest) as reader:
        entry = reader.entries[raw[0].key]
        assert entry.mode == "raw" and entry.tensors[0].dtype == "float32"
        assert reader.read_sm_into(entry, reader.new_sm_buffer()).tobytes() == raw[0].raw
        assert reader.read_e_into(entry, reader.new_e_buffer()) == []


def test_read_only_destination(tmp_path, monkeypatch):
    if os.geteuid() != 0:  # a real read-only directory (root ignores permission bits)
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        with pytest.raises(ConversionError, match="permission denied"):
            new_writer(ro / "store")
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kw):
        if self.name.endswith(TMP_SUFFIX):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kw)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(ConversionError, match="read-only; choose a writable destination"):
        new_writer(tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_full_disk_mid_write_then_resume(tmp_path, experts, pristine_store, monkeypatch):
    calls = {"n": 0}
    real_write = writer_mod._write_bytes

    def fill_up(f, data):
        calls["n"] += 1
        if calls["n"] > 25:  # in the third expert (10 writes per expert), the disk is full
            f.write(bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(f, data)

    dest = tmp_path / "store"
    monkeypatch.setattr(writer_mod, "_write_bytes", fill_up)
    w = new_writer(dest)
    with pytest.raises(ConversionError, match="no space left on the device"):
        add_experts(w, experts)
    with pytest.raises(ConversionError, match="closed"):
        add_experts(w, experts)
    assert not dest.exists()
    assert_not_loadable(tmp_of(dest))
    monkeypatch.setattr(writer_mod, "_write_bytes", real_write)
    w = new_writer(dest)  # space was freed: re-run finishes the job
    assert 0 < len(w.completed) < len(experts)
    add_experts(w, experts)
    add_rest(w, tmp_path)
    w.finalize()
    assert store_files(dest) == store_files(pristine_store)


def test_leftover_finished_tmp_dir_is_reused_cleanly(tmp_path, experts, pristine_store):
    """Killed between writing the manifest and the rename: the re-run rebuilds and installs."""
    dest = tmp_path / "store"
    built = build_store(tmp_path / "elsewhere", experts)
    built.rename(tmp_of(dest))
    w = new_writer(dest)
    assert w.completed == frozenset()
    add_experts(w, experts)
    add_rest(w, tmp_path)
    w.finalize()
    assert store_files(dest) == store_files(pristine_store)
    with StoreReader(dest) as reader:
        assert ExpertKey(0, 0) in reader.entries
