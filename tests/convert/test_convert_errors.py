"""Bad input gets a ConversionError that says what is wrong; a broken store fails verify by name."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tests.convert.synthetic import write_checkpoint

from zipmoe import convert as convert_module
from zipmoe.convert import convert
from zipmoe.errors import ChecksumError, ConversionError, StoreIncompleteError, VerificationError
from zipmoe.report import MismatchError, verify_store
from zipmoe.store.reader import StoreReader


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("hf") / "small", layers=2, experts=2)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="does not exist"):
        convert(tmp_path / "nope", tmp_path / "store", progress=False)


def test_path_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConversionError, match="is a file"):
        convert(tmp_path / "f", tmp_path / "store", progress=False)


def test_no_config(tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    with pytest.raises(ConversionError, match=r"no config\.json"):
        convert(tmp_path / "hf", tmp_path / "store", progress=False)


def test_no_safetensors_mentions_bin(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "mixtral"}')
    (hf / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ConversionError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        convert(hf, tmp_path / "store", progress=False)


def test_missing_shard(small_hf: Path, tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    shutil.copytree(small_hf, hf)
    (hf / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConversionError, match=r"model-00002-of-00002.safetensors, which is missing"):
        convert(hf, tmp_path / "store", progress=False)


def test_truncated_safetensors(small_hf: Path, tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    shutil.copytree(small_hf, hf)
    shard = hf / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ConversionError, match="not valid safetensors"):
        convert(hf, tmp_path / "store", progress=False)


def test_not_an_moe_model(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    save_file({"model.layers.0.mlp.gate_proj.weight": torch.zeros(4, 4, dtype=torch.bfloat16)},
              str(hf / "model.safetensors"))
    with pytest.raises(ConversionError, match="Mixture-of-Experts"):
        convert(hf, tmp_path / "store", progress=False)


def test_destination_exists_needs_overwrite(small_hf: Path, tmp_path: Path) -> None:
    store = convert(small_hf, tmp_path / "store", progress=False)
    with pytest.raises(ConversionError, match="--overwrite"):
        convert(small_hf, store, progress=False)
    convert(small_hf, store, overwrite=True, coder="zstd", progress=False)
    with StoreReader(store) as reader:
        assert reader.manifest.codec_id == "zstd"


def test_destination_not_a_store_is_never_replaced(small_hf: Path, tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(ConversionError, match="not a zipmoe store"):
        convert(small_hf, tmp_path / "mine", overwrite=True, progress=False)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def _read_only_dir(tmp_path: Path) -> Path:
    """A directory we cannot create entries in (chmod does not stop root: then look for a ro mount)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        (ro / "probe").mkdir()
    except OSError:
        return ro
    (ro / "probe").rmdir()
    for line in Path("/proc/mounts").read_text().splitlines():
        mount, opts = line.split()[1], line.split()[3].split(",")
        if "ro" in opts and Path(mount).is_dir():
            try:
                (Path(mount) / "zipmoe-probe").mkdir()
            except OSError as exc:
                if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                    return Path(mount)
    pytest.skip("no read-only directory available (running as root without a read-only mount)")


def test_read_only_destination(small_hf: Path, tmp_path: Path) -> None:
    ro = _read_only_dir(tmp_path)
    with pytest.raises(ConversionError, match=r"read-only|permission denied|not permitted"):
        convert(small_hf, ro / "store", progress=False)


def test_disk_full_before_start(small_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(convert_module, "_free_bytes", lambda path: 1000)
    with pytest.raises(ConversionError, match="not enough free space"):
        convert(small_hf, tmp_path / "store", progress=False)


def test_disk_full_while_writing_then_resume(small_hf: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from zipmoe.store import writer as writer_module

    real, calls = writer_module._write_bytes, []

    def full_after_a_few(f, data):
        calls.append(len(data))
        if len(calls) > 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data)

    monkeypatch.setattr(writer_module, "_write_bytes", full_after_a_few)
    with pytest.raises(ConversionError, match="no space left"):
        convert(small_hf, tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()
    monkeypatch.setattr(writer_module, "_write_bytes", real)
    verify_store(convert(small_hf, tmp_path / "store", progress=False), against=small_hf, progress=False)


def test_verify_names_the_corrupt_chunk(mixtral_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(mixtral_store, store)
    with StoreReader(store) as reader:
        entry = reader.entries[max(reader.entries)]
    with open(store / "experts.bin", "r+b") as f:
        f.seek(entry.e_offset + 3)
        byte = f.read(1)
        f.seek(entry.e_offset + 3)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(ChecksumError, match=f"{entry.key} E-shard 0"):
        verify_store(store, progress=False)


def test_verify_against_another_checkpoint_names_the_tensor(mixtral_store: Path, tiny_checkpoint,
                                                          tmp_path: Path) -> None:
    from tests.tiny_models import build_tiny_checkpoint

    other = build_tiny_checkpoint("mixtral", tmp_path / "other", seed=1)
    with pytest.raises(VerificationError, match=r"layer 0 expert 0 gate \(model\.layers\.0\.block_sparse_moe"):
        verify_store(mixtral_store, against=other, progress=False)
    assert MismatchError is VerificationError  # the old name still catches it


def test_unfinished_store_is_not_a_store(mixtral_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(mixtral_store, store)
    (store / "zipmoe.json").unlink()
    with pytest.raises(StoreIncompleteError):
        verify_store(store, progress=False)


def test_store_is_installed_only_after_verification(small_hf: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def corrupt(self, progress=None):
        raise ChecksumError("layer 0 expert 0 SM plane: checksum mismatch (simulated bad disk)")

    monkeypatch.setattr(StoreReader, "verify_all", corrupt)
    with pytest.raises(ConversionError, match=r"failed verification, nothing was installed.*simulated bad"):
        convert(small_hf, tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()
    assert not (tmp_path / "store.zipmoe-tmp" / "zipmoe.json").exists()
    monkeypatch.undo()
    verify_store(convert(small_hf, tmp_path / "store", progress=False), progress=False)
