"""Batched rounds (serve/shared_step.py): one expert load per layer for all running requests, each
request's own batch-1 compute, no hangs when the source or a request fails."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import openai
import pytest
import torch
from tests.serve.conftest import LiveServer, stream_chats
from tests.serve.test_server import http, metric_value

from zipmoe.generation import SamplingParams, encode_chat, encode_prompt, generate, load_handle
from zipmoe.models.load import unload
from zipmoe.serve.service import GenerationService, collect
from zipmoe.serve.shared_step import Batcher, SharedExperts, SharedLoadError

TIMEOUT_S = 60  # a round that takes longer than this is hung


class FakeSource:
    """An ExpertSource that serves every expert from ONE buffer, refilled with the expert id (like an
    engine staging slot): a consumer that still reads an expert after the source moved on sees it change."""

    def __init__(self, fail_at: tuple[int, int] | None = None, skip: int | None = None, with_hint: bool = False):
        self.fail_at, self.skip = fail_at, skip  # raise at (layer, expert) / never yield this expert
        self.calls: list[tuple[int, list[int]]] = []
        self.tokens: list[list[int] | None] = []  # the token counts each call was given
        self.hints: list[tuple[int, list[int]]] = []
        self.threads: set[str] = set()
        self.buf = torch.zeros(4)
        if not with_hint:
            self.hint = None

    def experts(self, layer: int, needed: Sequence[int],
                tokens: Sequence[int] | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        self.calls.append((layer, list(needed)))
        self.tokens.append(None if tokens is None else list(tokens))
        self.threads.add(threading.current_thread().name)
        for e in needed:
            if (layer, e) == self.fail_at:
                raise RuntimeError(f"bad chunk in expert {e}")
            if e == self.skip:
                continue
            self.buf.fill_(e)
            yield e, self.buf, self.buf

    def hint(self, layer: int, experts: list[int]) -> None:
        self.hints.append((layer, list(experts)))


def forward(shared: SharedExperts, plan: Sequence[tuple[int, list[int]]], pause: float = 0.002,
            fail_after: int | None = None, hint: list[int] | None = None,
            tokens: int | None = None) -> Callable[[], list]:
    """A stand-in for one request's forward: per MoE layer, ask for `needed` and "compute" with each expert."""

    def step() -> list[tuple[int, int]]:
        got = []
        for layer, needed in plan:
            if hint is not None:
                shared.hint(layer + 1, hint)
            counts = None if tokens is None else [tokens] * len(needed)
            for e, gate_up, _ in shared.experts(layer, needed, counts):
                time.sleep(pause)  # compute; the buffer must still hold this expert afterwards
                assert gate_up[0].item() == e, "the source moved on before this request was done"
                got.append((layer, e))
                if fail_after is not None and len(got) == fail_after:
                    raise ValueError("this request's forward failed")
        return got

    return step


def run_round(batcher: Batcher, steps: list[Callable[[], list]]) -> list:
    """batcher.run on another thread, failing (instead of hanging the suite) if it does not finish."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(batcher.run(steps)), name="test-engine-thread")
    t.start()
    t.join(TIMEOUT_S)
    assert not t.is_alive(), "the round hung"
    return out[0]


PLANS = [  # per request: (layer, needed experts) for two MoE layers
    [(0, [0, 1]), (1, [2, 5])],
    [(0, [1, 3]), (1, [2, 3])],
    [(0, [1]), (1, [0, 5])],
]


def test_one_load_per_layer_for_everyone_and_each_gets_its_experts():
    source = FakeSource()
    shared = SharedExperts(source)
    out = run_round(Batcher(shared), [forward(shared, plan) for plan in PLANS])
    assert out == [[(layer, e) for layer, needed in plan for e in needed] for plan in PLANS]
    assert source.calls == [(0, [0, 1, 3]), (1, [0, 2, 3, 5])]  # the sorted union, once per layer
    assert source.threads == {"test-engine-thread"}  # only the driver iterates the source
    stats = shared.stats.snapshot()
    assert (stats["requested"], stats["loaded"], stats["layers"], stats["rounds"], stats["steps"]) == (11, 7, 2, 1, 3)
    assert stats["saved"] == 4


def test_the_source_gets_each_experts_tokens_summed_over_the_round():
    """LRFU weighs an access by its tokens: a shared load must not count an expert three requests use once."""
    source = FakeSource()
    shared = SharedExperts(source)
    run_round(Batcher(shared), [forward(shared, plan, tokens=t) for plan, t in zip(PLANS, (1, 2, 4), strict=True)])
    # layer 0: expert 0 <- request 0 (1); 1 <- all three (1 + 2 + 4); 3 <- request 1 (2)
    assert source.tokens == [[1, 7, 2], [4, 3, 2, 5]]  # layer 1: 0 <- r2; 2 <- r0 + r1; 3 <- r1; 5 <- r0 + r2
    source = FakeSource()
    shared = SharedExperts(source)
    run_round(Batcher(shared), [forward(shared, PLANS[0], tokens=1), forward(shared, PLANS[1])])
    assert source.tokens == [None, None], "a request that gave no counts makes the round give none"


def test_alone_the_step_runs_on_the_calling_thread_and_passes_through():
    source = FakeSource()
    shared = SharedExperts(source)
    batcher = Batcher(shared)
    assert batcher.run([lambda: threading.current_thread().name]) == [threading.current_thread().name]
    assert run_round(batcher, [forward(shared, PLANS[0])]) == [[(0, 0), (0, 1), (1, 2), (1, 5)]]
    assert batcher._pool is None, "one request must not start request threads"
    assert source.calls == [(0, [0, 1]), (1, [2, 5])]
    assert shared.stats.rounds == 0 and shared.stats.requested == shared.stats.loaded == 4


def test_a_source_failure_reaches_only_the_requests_still_waiting():
    source = FakeSource(fail_at=(1, 3))  # layer 1's union is [0, 2, 3, 5]: 0 and 2 come out first
    shared = SharedExperts(source)
    batcher = Batcher(shared)
    plans = [*PLANS, [(0, [1]), (1, [0, 2])]]
    out = run_round(batcher, [forward(shared, plan) for plan in plans])
    for i in (0, 1, 2):  # each still wanted 3 or 5 when the source failed
        assert isinstance(out[i], SharedLoadError) and "bad chunk in expert 3" in str(out[i])
        assert isinstance(out[i].__cause__, RuntimeError)
    assert out[3] == [(0, 1), (1, 0), (1, 2)]  # got everything before the failure
    source.fail_at = None  # the engine thread lives on: the next round is served normally
    out = run_round(batcher, [forward(shared, plan) for plan in PLANS])
    assert out == [[(layer, e) for layer, needed in plan for e in needed] for plan in PLANS]
    batcher.close()


def test_a_source_that_skips_an_expert_fails_its_requests_without_hanging():
    shared = SharedExperts(FakeSource(skip=5))
    out = run_round(Batcher(shared), [forward(shared, plan) for plan in PLANS])
    assert isinstance(out[0], SharedLoadError) and "[5]" in str(out[0])
    assert isinstance(out[2], SharedLoadError)
    assert out[1] == [(0, 1), (0, 3), (1, 2), (1, 3)]


def test_a_failing_or_finished_request_never_holds_up_the_others():
    source = FakeSource()
    shared = SharedExperts(source)
    steps = [forward(shared, PLANS[0], fail_after=1), forward(shared, PLANS[1]), lambda: "no forward",
             forward(shared, [(0, []), (1, [4])])]  # nothing routed at layer 0
    out = run_round(Batcher(shared), steps)
    assert isinstance(out[0], ValueError)
    assert out[1] == [(0, 1), (0, 3), (1, 2), (1, 3)]
    assert out[2] == "no forward"
    assert out[3] == [(1, 4)]
    assert source.calls[-1] == (1, [2, 3, 4])  # the failed request's layer-1 experts were never loaded


def test_hints_are_merged_by_rank_and_given_once_before_the_layer():
    source = FakeSource(with_hint=True)
    shared = SharedExperts(source)
    steps = [forward(shared, [(0, [0])], hint=[4, 1]), forward(shared, [(0, [1])], hint=[2, 4, 3])]
    run_round(Batcher(shared), steps)
    assert source.hints == [(1, [4, 2, 1, 3])]
    assert SharedExperts(FakeSource()).hint is None  # no prefetcher: compute.py skips predicting


def test_install_wraps_the_engine_once_and_leaves_plain_models_alone(handle, store_handle):
    assert SharedExperts.install(handle.model) is None
    shared = SharedExperts.install(store_handle.model)
    assert shared is SharedExperts.install(store_handle.model)
    assert shared.source is store_handle.model.zipmoe_engine


def _serve_all(handle, prompts: list[list[int]], params: SamplingParams) -> tuple[list, GenerationService]:
    service = GenerationService(handle, max_running=16)

    async def main():
        reqs = [service.submit(ids, params) for ids in prompts]  # all queued before the first round
        service.start()
        return [await collect(r) for r in reqs]

    try:
        return asyncio.run(main()), service
    finally:
        service.stop()


@pytest.mark.parametrize("n", [4, 16])
def test_concurrent_requests_load_less_and_equal_zipmoe_generate(store_handle, n):
    params = SamplingParams(max_tokens=10)
    prompts = [encode_prompt(store_handle, f"the cat {i}") for i in range(n)]
    s0 = store_handle.stats()
    want = [generate(store_handle, ids, params) for ids in prompts]
    s1 = store_handle.stats()
    got, service = _serve_all(store_handle, prompts, params)
    s2 = store_handle.stats()
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.text for r in got] == [r.text for r in want]
    alone, together = (b["experts_served"] - a["experts_served"] for a, b in ((s0, s1), (s1, s2)))
    assert together < alone, f"{n} requests: the engine served {together} experts batched, {alone} one by one"
    read_alone, read_together = (b["bytes_read"] - a["bytes_read"] for a, b in ((s0, s1), (s1, s2)))
    assert 0 < read_together < read_alone, "the minimum budget should make the engine read, and batching read less"
    share = service.shared.stats.snapshot()
    assert share["rounds"] >= 1 and share["loaded"] < share["requested"]


def test_sixteen_streaming_clients_on_a_store_share_loads(store_handle):
    live = LiveServer(store_handle, api_key=None, max_running=16)
    try:
        prompts = [f"the mat {i}" for i in range(16)]
        want = {p: generate(store_handle, encode_chat(store_handle, [{"role": "user", "content": p}]),
                            SamplingParams(max_tokens=8)).text for p in prompts}
        def make_client() -> openai.OpenAI:
            return openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT_S)

        assert stream_chats(make_client, "tinychat", prompts, 8, 2 * TIMEOUT_S) == want
        assert metric_value(live, "zipmoe_batch_rounds_total") >= 1
        loads = metric_value(live, "zipmoe_batch_expert_loads_total")
        assert 0 < loads < metric_value(live, "zipmoe_batch_expert_requests_total")
        assert http(live, "/health", key=None)[1]["engine_alive"]
    finally:
        live.stop()


def test_concurrent_requests_on_a_resident_model_equal_zipmoe_generate(store_dir):
    """Everything fits: the experts run as the model's own weights (no source calls), and a round of
    concurrent requests must neither wait on a rendezvous nobody joins nor change any output."""
    handle = load_handle(store_dir, device="cpu", memory_budget=None, threads=1)
    try:
        assert handle.model.zipmoe_engine.resident
        params = SamplingParams(max_tokens=8)
        prompts = [encode_prompt(handle, f"a dog {i}") for i in range(4)]
        want = [generate(handle, ids, params) for ids in prompts]
        got, service = _serve_all(handle, prompts, params)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert service.shared.stats.snapshot()["loaded"] == 0
    finally:
        unload(handle.model)
