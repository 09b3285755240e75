"""Builders for tiny deterministic stores: fake experts split into planes here (no codec package needed).

E=experts per layer, K=exponent shards; BF16 values are u16 bit patterns; sizes in bytes.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash
import zstandard

from zipmoe.store.format import TensorSpec
from zipmoe.store.writer import StoreWriter
from zipmoe.types import ExpertKey

H, I = 96, 24  # hidden, expert intermediate: numel 3*H*I = 6912 -> SM plane spans two 4 KiB pages
SHAPES = (("gate", (I, H)), ("up", (I, H)), ("down", (H, I)))
CONFIG = {"model_type": "qwen2_moe", "hidden_size": H, "moe_intermediate_size": I, "num_experts": 3}


@dataclass
class FakeExpert:
    """One expert's original bits and the planes the writer receives."""

    key: ExpertKey
    u16: np.ndarray  # flat BF16 bits (split) or the raw bytes (raw experts)
    tensors: list[TensorSpec]
    sm: np.ndarray | None = None
    shards: list[bytes] | None = None
    bounds: list[tuple[int, int]] | None = None
    raw: bytes | None = None


def shard_bounds(numel: int, k: int) -> list[tuple[int, int]]:
    """K contiguous near-equal ranges (stands in for codec.shards.shard_bounds)."""
    cuts = [numel * i // k for i in range(k + 1)]
    return list(itertools.pairwise(cuts))


def _specs(layer: int, expert: int, dtype: str, values: np.ndarray) -> list[TensorSpec]:
    specs, offset = [], 0
    for name, shape in SHAPES:
        n = shape[0] * shape[1]
        part = values[offset : offset + n]
        specs.append(
            TensorSpec(
                name=name,
                hf_name=f"model.layers.{layer}.mlp.experts.{expert}.{name}_proj.weight",
                shape=shape,
                dtype=dtype,
                offset=offset,
                numel=n,
                checksum=xxhash.xxh3_64_intdigest(part.tobytes()),
            )
        )
        offset += n
    return specs


def fake_split_expert(layer: int, expert: int, k: int, codec: str) -> FakeExpert:
    """Gaussian-ish BF16 weights split into SM plane + K exponent shards (zstd-coded or raw)."""
    rng = np.random.default_rng(1000 * layer + expert)
    f32 = (rng.standard_normal(3 * H * I) * 0.02).astype(np.float32)
    u16 = (f32.view(np.uint32) >> 16).astype(np.uint16)
    sm = (((u16 >> 8) & 0x80) | (u16 & 0x7F)).astype(np.uint8)
    exp = ((u16 >> 7) & 0xFF).astype(np.uint8)
    bounds = shard_bounds(u16.size, k)
    coder = zstandard.ZstdCompressor(level=3)
    shards = [
        coder.compress(exp[a:b].tobytes()) if codec == "zstd" else exp[a:b].tobytes() for a, b in bounds
    ]
    return FakeExpert(
        ExpertKey(layer, expert), u16, _specs(layer, expert, "bfloat16", u16), sm, shards, bounds
    )


def fake_raw_expert(layer: int, expert: int) -> FakeExpert:
    """A float32 expert stored raw (no split)."""
    values = np.random.default_rng(7 + expert).standard_normal(3 * H * I).astype(np.float32)
    return FakeExpert(
        ExpertKey(layer, expert), values, _specs(layer, expert, "float32", values), raw=values.tobytes()
    )


def fake_experts(
    layers: int = 2, experts: int = 3, k: int = 4, codec: str = "zstd", raw_layer: bool = True
) -> list[FakeExpert]:
    """Split experts for `layers` layers, plus (raw_layer) one raw float32 expert in a last layer."""
    out = [fake_split_expert(layer, e, k, codec) for layer in range(layers) for e in range(experts)]
    if raw_layer:
        out.append(fake_raw_expert(layers, 0))
    return out


def merge(sm: np.ndarray, exp: np.ndarray) -> np.ndarray:
    """Reference merge of the planes back into BF16 bits."""
    sm16, exp16 = sm.astype(np.uint16), exp.astype(np.uint16)
    return ((sm16 & 0x80) << 8) | (exp16 << 7) | (sm16 & 0x7F)


def dense_tensors() -> dict[str, tuple[str, list[int], bytes]]:
    """Non-expert tensors as (dtype, shape, raw bytes)."""
    rng = np.random.default_rng(99)
    embed = rng.integers(0, 2**16, size=(10, H), dtype=np.uint16)  # any BF16 bit pattern, NaNs included
    norm = rng.standard_normal(H).astype(np.float32)
    return {
        "model.embed_tokens.weight": ("bfloat16", [10, H], embed.tobytes()),
        "model.norm.weight": ("float32", [H], norm.tobytes()),
    }


def add_experts(writer: StoreWriter, experts: list[FakeExpert]) -> None:
    """Feed experts to the writer the way a converter would."""
    for fx in experts:
        if fx.raw is not None:
            writer.add_raw_expert(fx.key, fx.tensors, fx.raw)
        else:
            assert fx.sm is not None and fx.shards is not None and fx.bounds is not None
            writer.add_expert(fx.key, fx.tensors, fx.sm, fx.shards, shard_bounds=fx.bounds)


def add_rest(writer: StoreWriter, tmp: Path) -> None:
    """Config, tokenizer and dense weights."""
    writer.add_file_bytes("config.json", json.dumps(CONFIG, indent=2).encode())
    tok = tmp / "tokenizer.json"
    tok.write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    writer.copy_files([tok])
    writer.add_dense_tensors(dense_tensors(), name="model.safetensors")


def build_store(
    dest: Path, experts: list[FakeExpert] | None = None, k: int = 4, codec: str = "zstd", **kw: object
) -> Path:
    """Write a complete tiny store at dest; returns dest."""
    experts = fake_experts(k=k, codec=codec) if experts is None else experts
    writer = StoreWriter(
        dest,
        codec_id=codec,
        codec_params={"level": 3} if codec == "zstd" else {},
        k=k,
        model_type="qwen2_moe",
        metadata={"source": "tests"},
        **kw,
    )  # type: ignore[arg-type]
    add_experts(writer, experts)
    add_rest(writer, dest.parent)
    return writer.finalize()


def decode_expert(fx: FakeExpert, sm: np.ndarray, shards: list[np.ndarray], codec: str) -> np.ndarray:
    """Decode shards and merge: the BF16 bits the engine would compute with."""
    d = zstandard.ZstdDecompressor()
    exp = b"".join(d.decompress(s.tobytes()) if codec == "zstd" else s.tobytes() for s in shards)
    return merge(sm, np.frombuffer(exp, dtype=np.uint8))


def store_files(root: Path) -> dict[str, bytes]:
    """Every file of a store, by relative name."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
