"""The first engine of a process ran 20–40 % slower than later ones on the device, with 60–85 ms more per
decode step between MoE layers (BENCHMARKS.md, third session). This runs the same batch-1 decode with the
calibrated routing on N engines loaded one after another in one process and prints, per engine: TPOT,
where the step went (Engine.trace), the CUDA allocator's segment events, garbage collections, and the
torch ops whose self CPU time changed most between the first and the last engine.

Found with it (BENCHMARKS.md, fourth session): cuDNN attention builds an execution graph per new
(batch, query length, key length), cached per thread, ~7 ms per call on the device; the first engine meets
every decode length first. The allocator was ruled out (a warm reserve and expandable segments change nothing).

    python scripts/first_engine.py HF_DIR STORE [--device cuda] [--budget-frac 0.25] [--engines 3] [--tokens 32]
        [--no-profile] [--reserve-gib G]

Qwen-shaped models (bench/engine.py builds one: runs/zb/hf, runs/zb/store-huffman).
"""

import argparse
import contextlib
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from zipmoe.bench.baselines.base import hook_routers
from zipmoe.bench.baselines.zipmoe_engine import store_geometry
from zipmoe.bench.metrics import cuda_allocator_counts, trace_summary
from zipmoe.bench.routing import RouterOverride, RoutingSampler
from zipmoe.models.load import load, unload


def one_engine(a, budget: int, cfg: dict, seed: int) -> dict:
    model = load(a.store, device=a.device, memory_budget=budget)
    override = RouterOverride(RoutingSampler("qwen1.5-moe-a2.7b", cfg["num_experts"], cfg["num_experts_per_tok"],
                                             cfg["num_hidden_layers"], seed=seed))
    hook_routers(model, override)
    engine = model.zipmoe_engine
    ids = torch.randint(3, cfg["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(seed)).to(a.device)
    pauses = []
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - started[0])

    try:
        with torch.no_grad():
            override.begin(1)
            model.generate(input_ids=ids[:, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
            override.begin(1)
            engine.trace, n0, alloc0 = [], len(engine.stats.step_s), cuda_allocator_counts()
            gc.callbacks.append(on_gc)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device == "cuda" else [])
            prof = profile(activities=acts) if a.profile else None
            with prof or contextlib.nullcontext():
                model.generate(input_ids=ids, max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False,
                               pad_token_id=0)
            gc.callbacks.remove(on_gc)
        steps = engine.stats.step_s[n0:]
        ops = {e.key: e.self_cpu_time_total for e in prof.key_averages()} if prof is not None else {}
        return {"tpot_s": statistics.median(steps[1:]), "trace": trace_summary(engine.trace, cfg["num_hidden_layers"]),
                "allocator": {k: v - alloc0.get(k, 0) for k, v in cuda_allocator_counts().items()},
                "gc_pauses": len(pauses), "gc_pause_s": sum(pauses), "ops": ops}
    finally:
        engine.trace = None
        unload(model)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("hf")
    p.add_argument("store")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget-frac", type=float, default=0.25)
    p.add_argument("--engines", type=int, default=3)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--no-profile", dest="profile", action="store_false", help="time without the torch profiler")
    p.add_argument("--reserve-gib", type=float, default=0.0,
                   help="allocate and free this much device memory first, so the caching allocator starts warm")
    a = p.parse_args()
    if a.reserve_gib and a.device == "cuda":
        torch.empty(int(a.reserve_gib * 2**30), dtype=torch.uint8, device="cuda")  # freed at once, kept cached
    cfg = json.loads(Path(a.hf, "config.json").read_text())
    g = store_geometry(a.store, a.device)
    budget = g["dense"] + g["staging"] + int(a.budget_frac * g["expert_bf16"])
    runs = [one_engine(a, budget, cfg, seed=0) for _ in range(a.engines)]  # the same routing every time
    for i, r in enumerate(runs):
        t = {k: round(v, 1) for k, v in r["trace"].items() if v is not None and k.endswith("per_step")}
        print(f"engine {i}: TPOT {r['tpot_s'] * 1e3:.1f} ms, allocator {r['allocator']}, "
              f"gc {r['gc_pauses']} passes {r['gc_pause_s'] * 1e3:.1f} ms, per step {t}")
    first, last = runs[0]["ops"], runs[-1]["ops"]
    diff = sorted(((first.get(k, 0) - last.get(k, 0), k) for k in set(first) | set(last)), reverse=True)
    print("ops with the most more self CPU time (µs) in the first engine than in the last:")
    for d, k in diff[:15]:
        print(f"  {k}: +{d:.0f} ({first.get(k, 0):.0f} vs {last.get(k, 0):.0f})")


if __name__ == "__main__":
    main()
