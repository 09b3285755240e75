"""Everything-fits overhead: zipmoe with every expert decoded (F) vs plain transformers, same
model, same routing (the model's own), side by side in one process. Prints medians and the ratio.

    python scripts/everything_fits.py HF_DIR STORE [--device cpu|cuda] [--tokens 32] [--repeats 3] [--batches 1 16]
        [--profile N]   # also: torch.profiler over N decode steps of each model, the op tables side by side
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


def profile(model, ids, tokens, label):
    """Op table of `tokens` decode steps (after the prefill), for finding where two models differ."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.is_cuda else [])
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=1, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, use_cache=True)
        past, nxt = out.past_key_values, out.sequences[:, -1:]
        with torch_profile(activities=acts) as prof:
            for _ in range(tokens):
                o = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)
            if ids.is_cuda:
                torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    events = prof.key_averages()
    n_kernels = sum(e.count for e in events if e.device_type.name == "CUDA") if ids.is_cuda else 0
    print(f"==== {label}: {tokens} decode steps, {n_kernels} CUDA kernel launches\n{table}", flush=True)
    return {e.key: (e.count, e.self_cpu_time_total, getattr(e, "self_device_time_total", 0)) for e in events}


def python_profile(model, ids, tokens) -> dict:
    """cProfile of a generate() of `tokens` tokens: {function: (calls, own s)}."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    with torch.no_grad():
        prof.enable()
        model.generate(input_ids=ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        prof.disable()
    return {f"{k[2]} ({k[0].rsplit('/', 2)[-1]}:{k[1]})": (v[1], v[2]) for k, v in pstats.Stats(prof).stats.items()}


def print_python_difference(ref: dict, ours: dict) -> None:
    rows = []
    for name in set(ref) | set(ours):
        (c1, t1), (c2, t2) = ref.get(name, (0, 0.0)), ours.get(name, (0, 0.0))
        if c1 != c2 or abs(t2 - t1) > 2e-4:
            rows.append((abs(t2 - t1), name, c1, c2, t1, t2))
    print("python function: calls ref/ours, own ms ref/ours; totals", f"{sum(v[1] for v in ref.values()) * 1e3:.1f}",
          f"{sum(v[1] for v in ours.values()) * 1e3:.1f}")
    for _, name, c1, c2, t1, t2 in sorted(rows, reverse=True)[:40]:
        print(f"  {name}: {c1}/{c2}, {t1 * 1e3:.2f}/{t2 * 1e3:.2f}")


def print_difference(ref: dict, ours: dict) -> None:
    """Ops whose call count or self time differs between the two models (µs)."""
    rows = []
    for name in set(ref) | set(ours):
        (c1, t1, d1), (c2, t2, d2) = ref.get(name, (0, 0, 0)), ours.get(name, (0, 0, 0))
        if c1 != c2 or abs(t2 - t1) > 50 or abs(d2 - d1) > 50:
            rows.append((abs(t2 - t1) + abs(d2 - d1), name, c1, c2, t1, t2, d1, d2))
    print("op: calls ref/ours, self CPU µs ref/ours, self device µs ref/ours")
    for _, name, c1, c2, t1, t2, d1, d2 in sorted(rows, reverse=True)[:40]:
        print(f"  {name}: {c1}/{c2}, {t1:.0f}/{t2:.0f}, {d1:.0f}/{d2:.0f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("hf")
    p.add_argument("store")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--profile", type=int, default=0, help="decode steps to profile per model at batch 1 (0: none)")
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
        if a.profile and batch == 1:
            print_difference(profile(ref, ids, a.profile, "transformers"),
                             profile(ours, ids, a.profile, "zipmoe resident"))
            print_python_difference(python_profile(ref, ids, a.profile), python_profile(ours, ids, a.profile))
        print(f"batch {batch}: transformers TPOT {r * 1e3:.2f} ms, zipmoe (all F) {z * 1e3:.2f} ms, ratio {z / r:.3f}")
    unload(ours)


if __name__ == "__main__":
    time.sleep(0)
    main()
