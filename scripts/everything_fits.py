"""Everything-fits overhead: zipmoe with every expert decoded (F) vs plain transformers, same
model, same routing (the model's own), side by side in one process. Prints medians and the ratio.

    python scripts/everything_fits.py HF_DIR STORE [--device cpu|cuda] [--tokens 32] [--repeats 3] [--batches 1 16]
"""
import argparse
import statistics
import time

import torch
import transformers

from zipmoe.engine.metrics import EngineStats, StepClock
from zipmoe.models.load import load, unload


def tpot(model, ids, tokens):
    stats = EngineStats()
    clock = StepClock(stats)
    pre = model.register_forward_pre_hook(clock.pre, with_kwargs=True)
    post = model.register_forward_hook(clock.post, with_kwargs=True)
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    pre.remove()
    post.remove()
    return statistics.median(stats.step_s[1:])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("hf")
    p.add_argument("store")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    a = p.parse_args()
    ref = transformers.AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.bfloat16).to(a.device)
    ours = load(a.store, device=a.device, memory_budget=None)
    print(f"zipmoe serves the experts resident (the model's own kernels on the F pool): {ours.zipmoe_engine.resident}")
    for batch in a.batches:
        ids = torch.randint(3, 1000, (batch, 32), generator=torch.Generator().manual_seed(0)).to(a.device)
        tpot(ours, ids, 4)  # warm-up both
        tpot(ref, ids, 4)
        r, z = [], []
        for _ in range(a.repeats):  # interleaved
            r.append(tpot(ref, ids, a.tokens))
            z.append(tpot(ours, ids, a.tokens))
        r, z = statistics.median(r), statistics.median(z)
        print(f"batch {batch}: transformers TPOT {r * 1e3:.2f} ms, zipmoe (all F) {z * 1e3:.2f} ms, ratio {z / r:.3f}")
    unload(ours)


if __name__ == "__main__":
    time.sleep(0)
    main()
