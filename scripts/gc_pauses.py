"""Garbage-collection pauses during one generate() of a loaded zipmoe model (engine/heap.py's reason).

    python scripts/gc_pauses.py STORE [--budget BYTES] [--tokens 200] [--no-freeze]

Prints the collections per generation and their summed and longest pause. --no-freeze undoes load()'s
gc.freeze() first, to compare with what the engine did before it.
"""
import argparse
import gc
import time

import torch

from zipmoe.models.load import load, unload


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("store")
    p.add_argument("--budget", type=int, default=None)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--no-freeze", action="store_true")
    a = p.parse_args()
    model = load(a.store, memory_budget=a.budget, workers=1)
    if a.no_freeze:
        gc.unfreeze()
    pauses: list[tuple[int, float]] = []
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append((info["generation"], time.perf_counter() - started[0]))

    ids = torch.randint(3, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        gc.callbacks.append(on_gc)
        t0 = time.perf_counter()
        model.generate(input_ids=ids, max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False,
                       pad_token_id=0)
        wall = time.perf_counter() - t0
        gc.callbacks.remove(on_gc)
    by_gen = {g: (sum(1 for x, _ in pauses if x == g), sum(d for x, d in pauses if x == g)) for g in (0, 1, 2)}
    print(f"{a.tokens} tokens in {wall:.2f} s; tracked objects {len(gc.get_objects())}, frozen {gc.get_freeze_count()}")
    for g, (n, s) in by_gen.items():
        print(f"  generation {g}: {n} collections, {s * 1e3:.1f} ms in all")
    print(f"  longest pause {max((d for _, d in pauses), default=0.0) * 1e3:.1f} ms")
    unload(model)


if __name__ == "__main__":
    main()
