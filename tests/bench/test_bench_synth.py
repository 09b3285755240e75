"""The synthetic checkpoint builder writes what transformers writes, deterministically, loadably."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from zipmoe.bench import synth
from zipmoe.errors import ZipMoEError

TINY = dict(layers=2, scale=1 / 32)


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    index = d / "model.safetensors.index.json"
    files = {"model.safetensors"}
    if index.exists():
        files = set(json.loads(index.read_text())["weight_map"].values())
    out: dict[str, torch.Tensor] = {}
    for fn in sorted(files):
        with safe_open(d / fn, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


@pytest.mark.parametrize("shape", sorted(synth.SHAPES))
def test_loads_and_matches_save_pretrained(shape: str, tmp_path: Path) -> None:
    out = synth.build_synthetic(shape, tmp_path / "syn", seed=5, max_shard_bytes=200_000, progress=False,
                                **TINY)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    logits = model(torch.arange(10).unsqueeze(0)).logits
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path / "ref")  # what transformers itself writes for this model_type
    mine, ref = _tensors(out), _tensors(tmp_path / "ref")
    assert sorted(mine) == sorted(ref)
    for name, t in ref.items():
        assert mine[name].dtype == t.dtype and mine[name].shape == t.shape, name
        assert torch.equal(mine[name], t), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in mine.values())


def test_deterministic_and_layer_prefix(tmp_path: Path) -> None:
    def digest(d: Path) -> str:
        h = hashlib.sha256()
        for f in sorted(d.glob("*.safetensors")):
            h.update(f.read_bytes())
        return h.hexdigest()

    a = synth.build_synthetic("olmoe-1b-7b", tmp_path / "a", seed=1, progress=False, workers=2, **TINY)
    b = synth.build_synthetic("olmoe-1b-7b", tmp_path / "b", seed=1, progress=False, workers=1, **TINY)
    c = synth.build_synthetic("olmoe-1b-7b", tmp_path / "c", seed=2, progress=False, **TINY)
    assert digest(a) == digest(b) != digest(c)
    three = _tensors(synth.build_synthetic("olmoe-1b-7b", tmp_path / "d", seed=1, layers=3, scale=1 / 32,
                                           progress=False))
    two = _tensors(a)
    assert set(two) < set(three) and all(torch.equal(two[k], three[k]) for k in two)


def test_values_are_bf16_rounded_normals() -> None:
    values = synth._Values(seed=0)
    spec = synth.TensorSpec("w", (1 << 21,), "BF16", "normal")
    u16 = values.chunk(spec, 0, 1 << 21)
    assert np.array_equal(values.chunk(spec, 12345, 777), u16[12345:12345 + 777])  # chunking-invariant
    f = (u16.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    assert abs(f.std() - synth.SIGMA) < 2e-4 and abs(f.mean()) < 1e-4
    normal = np.random.default_rng(0).standard_normal(1 << 21).astype(np.float32)
    ref = (normal * np.float32(synth.SIGMA)).view(np.uint32)
    ref16 = ((ref + 0x7FFF + ((ref >> 16) & 1)) >> 16).astype(np.uint16)  # RNE to BF16

    def entropy(x: np.ndarray) -> float:
        p = np.bincount((x >> 7) & 0xFF, minlength=256) / x.size
        p = p[p > 0]
        return float(-(p * np.log2(p)).sum())

    assert abs(entropy(u16) - entropy(ref16)) < 0.01  # exponent entropy ≈ 2.55 bits, like trained weights
    f32 = values.chunk(synth.TensorSpec("w", (8,), "F32", "normal"), 0, 8)
    assert np.array_equal(f32, values.chunk(synth.TensorSpec("w", (8,), "BF16", "normal"), 0, 8).astype(
        np.uint32) << 16)
    assert (values.chunk(synth.TensorSpec("n", (4,), "BF16", "ones"), 0, 4) == 0x3F80).all()


@pytest.mark.parametrize(("shape", "params"), [("qwen1.5-moe-a2.7b", 14.3e9), ("deepseek-v2-lite", 15.7e9),
                                               ("olmoe-1b-7b", 6.9e9)])
def test_full_size_tables_match_transformers(shape: str, params: float, tmp_path: Path) -> None:
    cfg = synth.scaled_config(shape)
    table = synth.tensor_table(cfg)
    n = sum(t.numel for t in table)
    assert math.isclose(n, params, rel_tol=0.01)
    synth._write_configs(tmp_path, cfg)
    config = AutoConfig.from_pretrained(tmp_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == n


def test_bad_input_raises(tmp_path: Path) -> None:
    with pytest.raises(ZipMoEError, match="unknown synthetic shape"):
        synth.build_synthetic("mixtral", tmp_path / "x")
    with pytest.raises(ZipMoEError, match="--layers"):
        synth.scaled_config("deepseek-v2-lite", layers=1)
    with pytest.raises(ZipMoEError, match="--scale"):
        synth.scaled_config("olmoe-1b-7b", scale=0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    for overwrite in (False, True):  # never deletes a directory it did not write
        with pytest.raises(ZipMoEError, match="not empty"):
            synth.build_synthetic("olmoe-1b-7b", tmp_path / "full", overwrite=overwrite, **TINY)
    assert (tmp_path / "full" / "f").exists()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--shape", "qwen1.5-moe-a2.7b", "--out", str(tmp_path / "m"), "--layers", "1", "--scale", "0.03"]
    assert synth.main(argv) == 0
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    assert "GB/s" in capsys.readouterr().out
    assert synth.main(argv) == 2  # not empty
    assert synth.main([*argv, "--overwrite"]) == 0
