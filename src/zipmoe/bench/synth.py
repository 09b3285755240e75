"""Synthetic full-size MoE checkpoints in real Hugging Face format, for benchmarks.

bench stage, offline: (shape name, layers, scale, seed) → config.json + generation_config.json +
model-XXXXX-of-YYYYY.safetensors shards + model.safetensors.index.json + synthetic.json (provenance).
Tensor names are exactly those transformers' save_pretrained writes (per-expert Hub names; checked in
tests/bench against a tiny model saved by transformers). Weights are N(0, σ=0.02) rounded to BF16
(the exponent entropy of trained weights), norms are ones. Each element is a pure function of
(seed, tensor name, element index) — a counter-based generator — so the output is identical whatever
the chunking, thread count or --layers, and a --layers N model equals the first N layers of the full one.
Generation runs on `workers` threads (numba, nogil); the main thread streams bytes to disk, shard by
shard, holding at most ~2 × workers chunks in memory. The index is written last: present = complete.
H=hidden I=intermediate E=routed experts V=vocab; sizes in bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
import xxhash
from tqdm import tqdm

from zipmoe.errors import ZipMoEError

SIGMA = 0.02  # std of every random weight
CHUNK_ELEMS = 1 << 22  # elements generated per task (8 MiB of BF16); does not affect the values
GENERATOR_VERSION = 1  # bump if the value of any element for a given (seed, name, index) changes
_BF16_ONE = 0x3F80
_ARCHITECTURES = {"qwen2_moe": "Qwen2MoeForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
                  "olmoe": "OlmoeForCausalLM"}

# Real configs (HF Hub config.json of each model), as transformers-5 config kwargs.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen1.5-moe-a2.7b": dict(
        model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False, max_position_embeddings=8192,
        max_window_layers=21, rms_norm_eps=1e-6, rope_theta=1e6, use_sliding_window=False,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643,
    ),
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
        kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        norm_topk_prob=False, routed_scaling_factor=1.0, topk_method="greedy", n_group=1, topk_group=1,
        max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                          beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
        tie_word_embeddings=False, bos_token_id=100000, eos_token_id=100001,
    ),
    "olmoe-1b-7b": dict(
        model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        norm_topk_prob=False, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
        clip_qkv=None, tie_word_embeddings=False, pad_token_id=1, eos_token_id=50279, bos_token_id=None,
    ),
}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor of the checkpoint, in file order."""

    name: str  # Hub name, as save_pretrained writes it
    shape: tuple[int, ...]  # elements per dimension
    dtype: str  # safetensors dtype: "BF16" or "F32"
    init: str  # "normal" (N(0, SIGMA) rounded to BF16) or "ones"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * (4 if self.dtype == "F32" else 2)


# ---------------------------------------------------------------- config: shape × layers × scale

def _r(x: float, mult: int, floor: int) -> int:
    return max(floor, mult * round(x / mult))


def scaled_config(shape: str, *, layers: int | None = None, scale: float = 1.0) -> dict[str, Any]:
    """The HF config kwargs of `shape`, cut to `layers` decoder layers and shrunk by `scale`.

    scale shrinks hidden (multiple of 64, heads = min(original, hidden/64), ≥ 2), every intermediate size
    (multiple of 16), MLA ranks, vocab and the number of routed experts (≥ 2 × top-k); top-k is kept.
    """
    if shape not in SHAPES:
        raise ZipMoEError(f"unknown synthetic shape {shape!r}: choose one of {sorted(SHAPES)}")
    if not (0.0 < scale <= 1.0):
        raise ZipMoEError(f"--scale must be in (0, 1], got {scale}")
    cfg = json.loads(json.dumps(SHAPES[shape]))
    if layers is not None:
        first_moe = cfg.get("first_k_dense_replace", 0)
        if not (first_moe < layers <= cfg["num_hidden_layers"]):
            raise ZipMoEError(f"--layers must be in [{first_moe + 1}, {cfg['num_hidden_layers']}] for "
                              f"{shape} (at least one MoE layer), got {layers}")
        cfg["num_hidden_layers"] = layers
    if scale == 1.0:
        return cfg
    hidden = _r(cfg["hidden_size"] * scale, 64, 64)
    heads = max(2, min(cfg["num_attention_heads"], hidden // 64))
    cfg.update(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads,
               vocab_size=_r(cfg["vocab_size"] * scale, 64, 256))
    for key in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
                "kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
        if cfg.get(key):
            cfg[key] = _r(cfg[key] * scale, 16, 16)
    if "qk_rope_head_dim" in cfg:
        cfg["qk_rope_head_dim"] = _r(cfg["qk_rope_head_dim"] * scale, 8, 8)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # keep special ids inside the vocab
        if cfg.get(key) is not None:
            cfg[key] %= cfg["vocab_size"]
    ekey = "n_routed_experts" if "n_routed_experts" in cfg else "num_experts"
    cfg[ekey] = max(2 * cfg["num_experts_per_tok"], round(cfg[ekey] * scale))
    return cfg


# ---------------------------------------------------------------- tensor tables, one per model_type

def _mlp(prefix: str, inter: int, hidden: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.down_proj.weight", (hidden, inter)), (f"{prefix}.gate_proj.weight", (inter, hidden)),
            (f"{prefix}.up_proj.weight", (inter, hidden))]


def _experts(prefix: str, n: int, inter: int, hidden: int) -> list[tuple[str, tuple[int, ...]]]:
    return [t for j in range(n) for t in _mlp(f"{prefix}.experts.{j}", inter, hidden)]


def _layer_qwen2_moe(c: dict[str, Any], p: str) -> list[tuple[str, tuple[int, ...]]]:
    h, hd = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    attn = [(f"{p}.self_attn.{n}_proj.{w}", (d, h) if w == "weight" else (d,))
            for n, d in (("q", q), ("k", kv), ("v", kv)) for w in ("weight", "bias")]
    mlp = [*_experts(f"{p}.mlp", c["num_experts"], c["moe_intermediate_size"], h),
           (f"{p}.mlp.gate.weight", (c["num_experts"], h)),
           *_mlp(f"{p}.mlp.shared_expert", c["shared_expert_intermediate_size"], h),
           (f"{p}.mlp.shared_expert_gate.weight", (1, h))]
    return [*attn, (f"{p}.self_attn.o_proj.weight", (h, q)), *mlp]


def _layer_olmoe(c: dict[str, Any], p: str) -> list[tuple[str, tuple[int, ...]]]:
    h, hd = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    return [(f"{p}.self_attn.q_proj.weight", (q, h)), (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)), (f"{p}.self_attn.o_proj.weight", (h, q)),
            (f"{p}.self_attn.q_norm.weight", (q,)), (f"{p}.self_attn.k_norm.weight", (kv,)),
            *_experts(f"{p}.mlp", c["num_experts"], c["intermediate_size"], h),
            (f"{p}.mlp.gate.weight", (c["num_experts"], h))]


def _layer_deepseek_v2(c: dict[str, Any], p: str, i: int) -> list[tuple[str, tuple[int, ...]]]:
    h, nh, rank = c["hidden_size"], c["num_attention_heads"], c["kv_lora_rank"]
    nope, rope, v = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    attn = [(f"{p}.self_attn.q_proj.weight", (nh * (nope + rope), h)),
            (f"{p}.self_attn.kv_a_proj_with_mqa.weight", (rank + rope, h)),
            (f"{p}.self_attn.kv_a_layernorm.weight", (rank,)),
            (f"{p}.self_attn.kv_b_proj.weight", (nh * (nope + v), rank)),
            (f"{p}.self_attn.o_proj.weight", (h, nh * v))]
    if i < c["first_k_dense_replace"]:
        return [*attn, *_mlp(f"{p}.mlp", c["intermediate_size"], h)]
    mi = c["moe_intermediate_size"]
    return [*attn, *_experts(f"{p}.mlp", c["n_routed_experts"], mi, h),
            (f"{p}.mlp.gate.weight", (c["n_routed_experts"], h)),
            *_mlp(f"{p}.mlp.shared_experts", mi * c["n_shared_experts"], h)]


def tensor_table(cfg: dict[str, Any]) -> list[TensorSpec]:
    """Every tensor of the checkpoint described by `cfg`, in file order (embeddings, layers, norm, head)."""
    mt, h, v = cfg["model_type"], cfg["hidden_size"], cfg["vocab_size"]
    rows: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        rows += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,))]
        if mt == "qwen2_moe":
            rows += _layer_qwen2_moe(cfg, p)
        elif mt == "olmoe":
            rows += _layer_olmoe(cfg, p)
        elif mt == "deepseek_v2":
            rows += _layer_deepseek_v2(cfg, p, i)
        else:
            raise ZipMoEError(f"no synthetic tensor table for model_type {mt!r}")
    rows += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    # transformers 5 keeps DeepSeek-V2's router in float32 and save_pretrained writes it so.
    f32 = {n for n, _ in rows if mt == "deepseek_v2" and n.endswith(".mlp.gate.weight")}
    return [TensorSpec(n, s, "F32" if n in f32 else "BF16", "ones" if n.endswith("norm.weight") else "normal")
            for n, s in rows]


# ---------------------------------------------------------------- values: counter-based BF16 normals

def _alias_table(sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Walker alias table (65536 buckets, 16-bit thresholds) for round_bf16(N(0, sigma)), exact to 2^-32."""
    mags = np.arange(0x7F80, dtype=np.uint32)  # non-negative finite BF16 patterns, ascending values
    vals = (mags << 16).view(np.float32).astype(np.float64)
    edges = np.concatenate([[0.0], (vals[:-1] + vals[1:]) / 2, [np.inf]])
    tail = np.frompyfunc(lambda x: 0.5 * math.erfc(x / (sigma * math.sqrt(2))), 1, 1)
    mass = (tail(edges[:-1]) - tail(edges[1:])).astype(np.float64)  # P(X rounds to this magnitude, X > 0)
    probs = np.zeros(65536)
    probs[mags] = mass
    probs[mags | 0x8000] = mass
    counts = np.floor(probs * 2.0**32).astype(np.int64)
    rest = (1 << 32) - int(counts.sum())  # largest remainder, so counts sum to exactly 2^32
    assert 0 <= rest <= 65536, rest
    counts[np.argsort(-(probs * 2.0**32 - counts), kind="stable")[:rest]] += 1
    prim, alias = np.arange(65536, dtype=np.uint16), np.zeros(65536, np.uint16)
    thr = np.full(65536, 1 << 16, np.uint32)
    small = [i for i in range(65536) if counts[i] < (1 << 16)]
    large = [i for i in range(65536) if counts[i] >= (1 << 16)]
    while small and large:
        s, g = small.pop(), large[-1]
        thr[s], alias[s] = counts[s], g
        counts[g] -= (1 << 16) - counts[s]
        if counts[g] < (1 << 16):
            small.append(large.pop())
    return prim, alias, thr


@numba.njit(nogil=True, cache=True)
def _fill_normal(out: np.ndarray, key: np.uint64, start: int, prim: np.ndarray, alias: np.ndarray,
                 thr: np.ndarray) -> None:  # pragma: no cover - compiled
    # splitmix64 of (key, element-pair counter c // 2); element c takes its 32-bit half → alias sample.
    for i in range(out.size):
        c = np.uint64(start + i)
        z = key + (c >> np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
        r = (z >> ((c & np.uint64(1)) * np.uint64(32))) & np.uint64(0xFFFFFFFF)
        b = r & np.uint64(0xFFFF)
        out[i] = prim[b] if (r >> np.uint64(16)) < thr[b] else alias[b]


class _Values:
    """Generates chunks of one tensor's raw bytes; thread-safe (no shared mutable state)."""

    def __init__(self, seed: int, sigma: float = SIGMA):
        self.seed, self.table = seed, _alias_table(sigma)

    def chunk(self, spec: TensorSpec, start: int, n: int) -> np.ndarray:
        u16 = np.empty(n, np.uint16)
        if spec.init == "ones":
            u16.fill(_BF16_ONE)
        else:
            key = np.uint64(xxhash.xxh64_intdigest(spec.name.encode(), seed=self.seed))
            _fill_normal(u16, key, start, *self.table)
        return (u16.astype(np.uint32) << 16) if spec.dtype == "F32" else u16


# ---------------------------------------------------------------- safetensors shards, streamed

def plan_shards(table: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy split in file order; a tensor larger than max_shard_bytes gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in table:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(specs: list[TensorSpec]) -> bytes:
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        meta[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _chunks(specs: list[TensorSpec]) -> Iterator[tuple[TensorSpec, int, int]]:
    for s in specs:
        for start in range(0, s.numel, CHUNK_ELEMS):
            yield s, start, min(CHUNK_ELEMS, s.numel - start)


def _write_shard(path: Path, specs: list[TensorSpec], values: _Values, pool: ThreadPoolExecutor,
                 depth: int, bar: tqdm) -> None:
    """Header first, then each tensor's bytes in order; generation runs `depth` chunks ahead on the pool."""
    tmp = path.with_suffix(".partial")
    pending: deque[Future[np.ndarray]] = deque()
    jobs = _chunks(specs)
    with open(tmp, "wb") as f:
        f.write(_header(specs))
        while True:
            while len(pending) < depth and (job := next(jobs, None)) is not None:
                pending.append(pool.submit(values.chunk, *job))
            if not pending:
                break
            buf = pending.popleft().result()
            f.write(memoryview(buf).cast("B"))
            bar.update(buf.nbytes)
        f.flush()
        os.fsync(f.fileno())
        if hasattr(os, "posix_fadvise"):  # keep the page cache for what the benchmark reads, not this
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    tmp.rename(path)


def _write_configs(out: Path, cfg: dict[str, Any]) -> None:
    from transformers import AutoConfig, GenerationConfig  # heavy; only the builder needs it

    kwargs = dict(cfg)
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, **kwargs)
    config.dtype = "bfloat16"
    config.architectures = [_ARCHITECTURES[model_type]]
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)


def build_synthetic(shape: str, out_dir: str | os.PathLike[str], *, layers: int | None = None,
                    scale: float = 1.0, seed: int = 0, max_shard_bytes: int = 4 << 30,
                    workers: int | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Write a random-weight checkpoint of `shape` (see SHAPES) to out_dir, streaming; returns out_dir.

    Deterministic in (shape, layers, scale, seed); loads with AutoModelForCausalLM.from_pretrained.
    """
    if seed < 0:
        raise ZipMoEError(f"seed must be a non-negative integer, got {seed}")
    if max_shard_bytes <= 0:
        raise ZipMoEError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    cfg = scaled_config(shape, layers=layers, scale=scale)
    table = tensor_table(cfg)
    total = sum(s.nbytes for s in table)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not (overwrite and (out / "synthetic.json").exists()):
            raise ZipMoEError(f"{out} is not empty: choose a new directory, or pass --overwrite to replace "
                              "a synthetic checkpoint written earlier")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if (free := shutil.disk_usage(out).free) < total:
        raise ZipMoEError(f"{shape} needs {total / 1e9:.1f} GB but {out} has {free / 1e9:.1f} GB free: "
                          "free space, pick another disk, or use --layers/--scale")
    _write_configs(out, cfg)
    shards = plan_shards(table, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    workers = workers or os.cpu_count() or 1
    values = _Values(seed)
    with ThreadPoolExecutor(workers, thread_name_prefix="synth") as pool, \
            tqdm(total=total, unit="B", unit_scale=True, desc=f"{shape}", disable=not progress) as bar:
        for name, specs in zip(names, shards, strict=True):
            _write_shard(out / name, specs, values, pool, 2 * workers, bar)
    index = {"metadata": {"total_size": total},
             "weight_map": {s.name: n for n, specs in zip(names, shards, strict=True) for s in specs}}
    provenance = dict(shape=shape, layers=layers, scale=scale, seed=seed, sigma=SIGMA,
                      generator_version=GENERATOR_VERSION, total_bytes=total,
                      num_parameters=sum(s.numel for s in table))
    (out / "synthetic.json").write_text(json.dumps(provenance, indent=2) + "\n")
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")  # last: complete
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m zipmoe.bench.synth --shape qwen1.5-moe-a2.7b --out DIR [--layers N] [--scale S]`."""
    ap = argparse.ArgumentParser(prog="python -m zipmoe.bench.synth", description=__doc__.split("\n")[0])
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--out", required=True, type=Path, help="output directory (must be empty or absent)")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink hidden/intermediate/experts (0, 1]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-gib", type=float, default=4.0)
    ap.add_argument("--workers", type=int, default=None, help="generator threads (default: all cores)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = build_synthetic(args.shape, args.out, layers=args.layers, scale=args.scale, seed=args.seed,
                              max_shard_bytes=int(args.max_shard_gib * 2**30), workers=args.workers,
                              overwrite=args.overwrite)
    except ZipMoEError as e:
        print(f"error: {e}")
        return 2
    info = json.loads((out / "synthetic.json").read_text())
    dt = time.perf_counter() - t0
    print(f"wrote {out}: {info['num_parameters'] / 1e6:.1f} M params, {info['total_bytes'] / 1e9:.2f} GB "
          f"in {dt:.1f} s ({info['total_bytes'] / 1e9 / dt:.2f} GB/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
