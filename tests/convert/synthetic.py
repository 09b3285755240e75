"""Synthetic MoE checkpoints written straight with safetensors (no transformers model is built).

Fast to make at any size, so tests can exercise what tiny_models.py cannot: the fused expert layout,
non-BF16 experts, many experts (the kill -9 test) and a few-hundred-MB input (convert throughput).
Weights are N(0, 0.02) like trained weights. H=hidden I=expert intermediate E=experts L=layers.

    python tests/convert/synthetic.py OUT_DIR --mb 300     # a ~300 MB mixtral-style checkpoint
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * 0.02).to(dtype)


def write_checkpoint(
    path: str | Path, *, layers: int = 2, experts: int = 4, hidden: int = 64, inter: int = 32,
    fused: bool = False, expert_dtype: torch.dtype = torch.bfloat16, files: int = 2, seed: int = 0,
) -> Path:
    """A mixtral-style (per-expert w1/w3/w2) or qwen3_moe-style (fused gate_up/down) checkpoint."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    model_type = "qwen3_moe" if fused else "mixtral"
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(files)]
    shards[0]["model.embed_tokens.weight"] = _randn(gen, 128, hidden, dtype=torch.bfloat16)
    shards[-1]["lm_head.weight"] = _randn(gen, 128, hidden, dtype=torch.bfloat16)
    shards[-1]["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    for layer in range(layers):
        out = shards[layer * files // layers]
        pre = f"model.layers.{layer}"
        out[f"{pre}.self_attn.q_proj.weight"] = _randn(gen, hidden, hidden, dtype=torch.bfloat16)
        out[f"{pre}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.float32)  # non-BF16 dense
        if fused:
            out[f"{pre}.mlp.gate.weight"] = _randn(gen, experts, hidden, dtype=torch.bfloat16)
            gate_up = _randn(gen, experts, 2 * inter, hidden, dtype=expert_dtype)
            out[f"{pre}.mlp.experts.gate_up_proj"] = gate_up
            out[f"{pre}.mlp.experts.down_proj"] = _randn(gen, experts, hidden, inter, dtype=expert_dtype)
            continue
        out[f"{pre}.block_sparse_moe.gate.weight"] = _randn(gen, experts, hidden, dtype=torch.bfloat16)
        for e in range(experts):
            for w, shape in (("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter))):
                name = f"{pre}.block_sparse_moe.experts.{e}.{w}.weight"
                out[name] = _randn(gen, *shape, dtype=expert_dtype)
    weight_map = {}
    for i, tensors in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{files:05d}.safetensors"
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {"model_type": model_type, "num_hidden_layers": layers, "hidden_size": hidden,
              "intermediate_size": inter, "moe_intermediate_size": inter, "num_experts_per_tok": 2,
              "num_local_experts" if not fused else "num_experts": experts, "vocab_size": 128,
              "decoder_sparse_step": 1, "mlp_only_layers": []}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    return path


def main() -> None:
    """Write a mixtral-style checkpoint of about --mb megabytes (experts dominate)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--mb", type=float, default=300)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--experts", type=int, default=16)
    args = p.parse_args()
    per_layer = args.experts * 3 * args.hidden * args.inter * 2
    layers = max(1, round(args.mb * 1e6 / per_layer))
    write_checkpoint(args.out, layers=layers, experts=args.experts, hidden=args.hidden, inter=args.inter,
                     files=max(1, layers // 2))
    mb = layers * per_layer / 1e6
    print(f"wrote {args.out}: {layers} layers x {args.experts} experts, {mb:.0f} MB of experts")


if __name__ == "__main__":
    main()
