"""Store round-trip per architecture: convert, then verify bit-for-bit against the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.convert.conftest import MODEL_TYPES
from tests.convert.synthetic import write_checkpoint

from zipmoe.convert import convert
from zipmoe.errors import ConversionError
from zipmoe.report import inspect_store, verify_store
from zipmoe.store.reader import StoreReader


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_convert_then_verify_against(model_type: str, tiny_checkpoint, tmp_path: Path) -> None:
    hf = tiny_checkpoint(model_type)
    store = convert(hf, tmp_path / "store", workers=2, progress=False)
    config = json.loads((hf / "config.json").read_text())
    report = verify_store(store, against=hf, progress=False)
    with StoreReader(store) as reader:
        n_experts = len(reader.entries)
        assert reader.manifest.model_type == model_type
        assert (store / "generation_config.json").read_bytes() == (hf / "generation_config.json").read_bytes()
    keys = ("num_experts", "num_local_experts", "n_routed_experts")
    per_layer = next(config[k] for k in keys if k in config)
    assert n_experts == config["num_hidden_layers"] * per_layer
    assert report.experts == n_experts and report.tensors == 3 * n_experts
    assert report.dense_tensors > 0 and report.files_compared >= 2


def test_fused_layout_roundtrip(tmp_path: Path) -> None:
    hf = write_checkpoint(tmp_path / "hf", fused=True, layers=2, experts=4)
    store = convert(hf, tmp_path / "store", shards=4, progress=False)
    report = verify_store(store, against=hf, progress=False)
    assert report.experts == 8 and report.tensors == 24
    with StoreReader(store) as reader:
        entry = reader.entries[min(reader.entries)]
        assert [t.name for t in entry.tensors] == ["gate", "up", "down"]
        assert [t.shape for t in entry.tensors] == [(32, 64), (32, 64), (64, 32)]


def test_store_holds_the_exact_expert_bits(tmp_path: Path) -> None:
    """Independent of verify: decode one expert by hand and compare with the safetensors tensor."""
    from safetensors import safe_open

    from zipmoe.report import _Decoder

    hf = write_checkpoint(tmp_path / "hf", layers=1, experts=2, hidden=256, inter=128)
    store = convert(hf, tmp_path / "store", coder="zstd", coder_params={"level": 3}, progress=False)
    with StoreReader(store) as reader:
        entry = reader.entries[max(reader.entries)]
        flat = _Decoder(reader).weights(entry)
        assert reader.manifest.codec_id == "zstd"
    name = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    file = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(str(hf / file), framework="pt") as f:
        want = f.get_tensor(name).view(torch.int16).numpy().view(np.uint16).reshape(-1)
    down = entry.tensor("down")
    assert np.array_equal(flat[down.offset : down.offset + down.numel], want)


def test_non_bf16_experts(tmp_path: Path) -> None:
    hf = write_checkpoint(tmp_path / "hf", layers=1, experts=2, expert_dtype=torch.float32)
    with pytest.raises(ConversionError, match=r"float32, not bfloat16.*--allow-raw"):
        convert(hf, tmp_path / "store", progress=False)
    store = convert(hf, tmp_path / "store", allow_raw=True, progress=False)
    assert verify_store(store, against=hf, progress=False).experts == 2
    assert inspect_store(store, progress=False)["raw_experts"] == 2


def test_inspect_json_is_sane(mixtral_store: Path) -> None:
    report = inspect_store(mixtral_store, progress=False)
    total = report["total"]
    assert 0 < total["entropy_bits"] < 8
    assert total["ratio"] >= 0.99 * total["floor_ratio"]
    assert total["ratio"] < 0.70  # near the ~0.66 floor of N(0, 0.02) weights, far below raw BF16
    assert total["floor_ratio"] == pytest.approx((8 + total["entropy_bits"]) / 16)
    assert [r["proj"] for r in report["by_projection"]] == ["gate", "up", "down"]
    assert [r["layer"] for r in report["by_layer"]] == [0, 1, 2]
    assert sum(r["numel"] for r in report["by_layer"]) == total["numel"]
    by_proj = sum(r["stored_bytes"] for r in report["by_projection"])
    assert by_proj == pytest.approx(total["stored_bytes"], abs=3)
    assert total["stored_bytes"] == total["sm_bytes"] + total["e_bytes"]
    assert json.loads(json.dumps(report)) == report


def test_generic_rule_for_an_unknown_model_type(tmp_path: Path) -> None:
    hf = write_checkpoint(tmp_path / "hf", layers=2, experts=3)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "brand_new_moe"}))
    store = convert(hf, tmp_path / "store", progress=False)
    assert verify_store(store, against=hf, progress=False).experts == 6
    with StoreReader(store) as reader:
        assert reader.manifest.model_type == "brand_new_moe"
