"""StepClock times each forward on its own thread: the server's batched rounds run forwards at once."""

from __future__ import annotations

import threading
import time

import torch

from zipmoe.engine.metrics import EngineStats, StepClock


def test_overlapping_forwards_on_two_threads_are_timed_separately() -> None:
    stats = EngineStats()
    clock = StepClock(stats)
    a_started, b_done = threading.Event(), threading.Event()

    def long_forward() -> None:  # starts first, ends last: 0.2 s
        clock.pre(None, (torch.zeros(1, 5, dtype=torch.long),), {})
        a_started.set()
        b_done.wait(5)
        time.sleep(0.2)
        clock.post(None, (), {}, None)

    def short_forward() -> None:  # starts after A, inside it
        a_started.wait(5)
        clock.pre(None, (), {"input_ids": torch.zeros(1, 1, dtype=torch.long)})
        time.sleep(0.01)
        clock.post(None, (), {}, None)
        b_done.set()

    threads = [threading.Thread(target=f) for f in (long_forward, short_forward)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    by_len = dict(zip(stats.step_tokens, stats.step_s, strict=True))
    assert stats.steps == 2 and set(by_len) == {1, 5}
    assert by_len[1] < 0.1  # the short one
    assert by_len[5] >= 0.2  # a shared start would have measured A from B's start, and given B's length to A
