"""Eviction policies on a real-text model with its own routers: the demo's upcycled SmolLM2 MoE (run
`zipmoe demo --workdir DIR` first). Three chat requests one after another on one loaded model (the
cache carries over, as in a server), 32 greedy tokens each; per policy and budget: share of decode-step
experts served from the cache, MB read per decode token, and whether the tokens equal LRU's.
Counts, not timings: the same on any machine.

    python scripts/demo_eviction.py DIR/smollm2-moe.zipmoe [--budgets-mib 300 400 600]
        [--policies lru lrfu lrfu-per-access lfu fifo marking] [--lrfu-half-lives 0.7]   (LRFU half-life per pool slot)
"""

from __future__ import annotations

import argparse

import transformers

from zipmoe.bench.cachesim import POLICIES  # ablation variants of LRFU (e.g. "lrfu-per-access")
from zipmoe.cache.policy import LRFU
from zipmoe.models.load import load, unload

PROMPTS = ["Explain in three sentences why the sky is blue.", "Write a haiku about autumn rain.",
           "What is the capital of France, and what is it famous for?"]


def run(store: str, budget: int, eviction: str, tok) -> tuple[float, float, list[list[int]]]:
    model = load(store, memory_budget=budget, eviction=POLICIES.get(eviction, eviction), workers=1)
    stats = model.zipmoe_engine.stats
    hits = served = read = steps = 0
    outs = []
    try:
        for prompt in PROMPTS:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt")
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            model(input_ids=ids)  # the prefill, counted apart from decoding
            before = stats.snapshot()
            out = model.generate(input_ids=ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
            after = stats.snapshot()
            outs.append(out[0, ids.shape[1]:].tolist())
            got = {k: after["hits"][k] - before["hits"][k] for k in after["hits"]}
            served += sum(got.values())
            hits += sum(v for k, v in got.items() if k != "MISS")
            read += after["bytes_read"] - before["bytes_read"]
            steps += 32
    finally:
        unload(model)
    return hits / max(1, served), read / steps / 2**20, outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--budgets-mib", type=int, nargs="+", default=[300, 400, 600])
    ap.add_argument("--policies", nargs="+", default=["lru", "lrfu", "lfu", "fifo", "marking"])
    ap.add_argument("--lrfu-half-lives", type=float, nargs="+", default=[LRFU.HALF_LIFE_PER_SLOT])
    a = ap.parse_args()
    tok = transformers.AutoTokenizer.from_pretrained(a.store)
    default = LRFU.HALF_LIFE_PER_SLOT
    for mib in a.budgets_mib:
        base = None
        runs = [(p, h) for p in a.policies for h in (a.lrfu_half_lives if p == "lrfu" else [None])]
        for eviction, half_life in runs:
            LRFU.HALF_LIFE_PER_SLOT = half_life or default
            try:
                hit, mb, outs = run(a.store, mib << 20, eviction, tok)
            finally:
                LRFU.HALF_LIFE_PER_SLOT = default
            base = outs if base is None else base
            name = eviction if half_life is None else f"{eviction} H={half_life:g}×slots"
            print(f"budget {mib} MiB  {name:16s} cache-served {hit:.3f}  MB read/decode token {mb:6.2f}  "
                  f"tokens equal the first policy's: {outs == base}", flush=True)


if __name__ == "__main__":
    main()
