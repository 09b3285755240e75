"""Expert loads and bytes read by N concurrent server requests vs the same N run one by one.

Builds the tiny random chat Mixtral of the tests (3 layers, 6 experts, top-2), converts it, loads it
under its minimum budget, then for each N runs N greedy requests with `zipmoe.generation.generate`
one after another and through `GenerationService` (batched rounds, shared expert loading), checks
the tokens are identical, and prints experts served, bytes read and wall time of both.
--read-bytes-per-s caps the engine's reads (its slow-disk emulation): the tiny experts (12 KiB) load
in microseconds, so without it the wall times show only the cost of the request threads.

    .venv/bin/python scripts/serve_batching.py --requests 1 4 16 --max-tokens 16 [--read-bytes-per-s 1e6]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.serve.tiny_chat

from tests.serve.tiny_chat import build_tiny_chat_model

from zipmoe.convert import convert
from zipmoe.errors import BudgetTooSmallError
from zipmoe.generation import ModelHandle, SamplingParams, encode_prompt, generate, load_handle
from zipmoe.serve.service import GenerationService, collect


def load_at_minimum(store: Path) -> ModelHandle:
    budget = 1
    while True:
        try:
            return load_handle(store, memory_budget=budget, threads=1)
        except BudgetTooSmallError as exc:
            budget = exc.minimum_bytes


def batched(handle: ModelHandle, prompts: list[list[int]], params: SamplingParams) -> list:
    service = GenerationService(handle, max_running=len(prompts))

    async def main() -> list:
        reqs = [service.submit(ids, params) for ids in prompts]  # all queued before the first round
        service.start()
        return [await collect(r) for r in reqs]

    try:
        return asyncio.run(main())
    finally:
        service.stop()


def measure(handle: ModelHandle, run) -> tuple[list, int, int, float]:
    before, t0 = handle.stats(), time.perf_counter()
    results = run()
    after = handle.stats()
    return (results, after["experts_served"] - before["experts_served"], after["bytes_read"] - before["bytes_read"],
            time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--read-bytes-per-s", type=float, default=None, help="emulate a disk this slow")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = convert(build_tiny_chat_model(Path(tmp) / "hf"), Path(tmp) / "tinychat", progress=False, workers=2)
        handle = load_at_minimum(store)
        handle.model.zipmoe_engine.read_bytes_per_s = args.read_bytes_per_s
        params = SamplingParams(max_tokens=args.max_tokens)
        print("requests | experts served alone -> batched | KiB read alone -> batched | s alone -> batched | same")
        for n in args.requests:
            prompts = [encode_prompt(handle, f"the cat {i}") for i in range(n)]
            alone = measure(handle, lambda prompts=prompts: [generate(handle, ids, params) for ids in prompts])
            together = measure(handle, lambda prompts=prompts: batched(handle, prompts, params))
            same = [r.token_ids for r in alone[0]] == [r.token_ids for r in together[0]]
            print(f"{n:8d} | {alone[1]:6d} -> {together[1]:6d} ({together[1] / alone[1]:.0%}) | "
                  f"{alone[2] / 1024:8.0f} -> {together[2] / 1024:8.0f} ({together[2] / max(alone[2], 1):.0%}) | "
                  f"{alone[3]:6.2f} -> {together[3]:6.2f} | {same}")


if __name__ == "__main__":
    main()
