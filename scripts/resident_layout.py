"""Does transformers' grouped_mm experts forward run as fast on the F pool's strided views as on
contiguous [E,2I,H] / [E,H,I] tensors? (everything-fits serving, engine/engine.py resident_weights)

    python scripts/resident_layout.py [--device cuda] [--repeats 50]

Prints the median time of one Qwen1.5-MoE-shaped experts layer (60 × 2048×1408, top-4) at batch 1
and 16 for both layouts, and whether the outputs are bit-identical.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers.integrations.moe import ExpertsInterface


class _Experts(torch.nn.Module):
    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up, down
        self.num_experts = gate_up.shape[0]
        self.has_gate, self.has_bias, self.is_transposed, self.is_concatenated = True, False, False, True
        self.has_post_expert_norm, self._is_expert_parallel = False, False
        self.act_fn = torch.nn.SiLU()

    def _apply_gate(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return self.act_fn(gate) * up


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    e, h, i, k = 60, 2048, 1408, 4
    numel = 3 * h * i
    g = torch.Generator().manual_seed(0)
    slab = (torch.randn(e, numel, generator=g) * 0.02).to(torch.bfloat16).to(args.device)
    strided = (slab[:, : 2 * i * h].view(e, 2 * i, h), slab[:, 2 * i * h :].view(e, h, i))
    contiguous = tuple(t.contiguous() for t in strided)
    forward = ExpertsInterface._global_mapping["grouped_mm"]
    for batch in (1, 16):
        x = (torch.randn(batch, h, generator=g) * 0.1).to(torch.bfloat16).to(args.device)
        idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(batch)]).to(args.device)
        w = torch.full((batch, k), 1.0 / k, dtype=torch.bfloat16, device=args.device)
        outs, times = {}, {}
        for name, (gu, dn) in (("contiguous", contiguous), ("pool views", strided)):
            mod = _Experts(gu, dn)
            ts = []
            for _ in range(args.repeats):
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = forward(mod, x, idx, w)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            outs[name], times[name] = out, statistics.median(ts[5:])
        same = torch.equal(outs["contiguous"], outs["pool views"])
        print(f"batch {batch}: contiguous {times['contiguous'] * 1e3:.3f} ms, pool views "
              f"{times['pool views'] * 1e3:.3f} ms, ratio {times['pool views'] / times['contiguous']:.2f}, "
              f"bit-identical {same}")


if __name__ == "__main__":
    main()
