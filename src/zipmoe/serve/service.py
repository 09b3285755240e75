"""The generation service: one engine thread owns the model and batches the running requests.

HTTP handlers (event-loop thread) `submit()` a request and read its events from an asyncio queue;
the engine thread admits waiting requests into up to `max_running` slots (FIFO), then advances every
running request by one token per round, pushing text deltas back to the event loop.
A request whose client went away is `cancel()`ed: its slot and KV cache are freed at the next round.
Batching (serve/shared_step.py): in a round, each request's forward runs on its own request thread
at batch 1, while the engine thread loads every MoE layer's experts once for all of them. Each
request's greedy text therefore equals `zipmoe generate`'s bit for bit, and an expert that N requests
need is loaded once, not N times. A model zipmoe does not serve (plain HF) steps them one by one.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from zipmoe.errors import ZipMoEError
from zipmoe.generation import Generation, GenerationResult, ModelHandle, SamplingParams
from zipmoe.serve.metrics import ServerMetrics
from zipmoe.serve.shared_step import Batcher, SharedExperts

log = logging.getLogger("zipmoe.serve")

DISCONNECT_POLL_S = 0.5  # how often a waiting handler asks whether its client is still there


@dataclass(frozen=True)
class Delta:
    text: str  # new completion text


@dataclass(frozen=True)
class Done:
    result: GenerationResult


@dataclass(frozen=True)
class Failed:
    message: str  # what went wrong inside the engine (the server keeps serving)


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop  # where events are delivered
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    t_submit: float = field(default_factory=time.perf_counter)

    def push(self, event: Delta | Done | Failed) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed (server shutting down)
            self.cancelled.set()


class GenerationService:
    def __init__(self, handle: ModelHandle, max_running: int = 16, max_waiting: int = 256,
                 metrics: ServerMetrics | None = None):
        if max_running < 1:
            raise ZipMoEError(f"max_running must be at least 1, got {max_running}")
        self.handle = handle
        self.max_running, self.max_waiting = max_running, max_waiting
        self.shared = SharedExperts.install(handle.model)  # None: a plain HF model, stepped one by one
        self.metrics = metrics or ServerMetrics(handle.stats_fn, self.shared.stats.snapshot if self.shared else None)
        self._batcher = Batcher(self.shared)
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[tuple[Request, Generation]] = []
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # --- event-loop side -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="zipmoe-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        """Queue a request (call from the event loop); its events arrive on request.events."""
        req = Request(list(prompt_ids), params, asyncio.get_running_loop())
        with self._wake:
            if len(self._waiting) >= self.max_waiting:
                raise ZipMoEError(f"server busy: {self.max_waiting} requests already waiting; retry later")
            self._waiting.append(req)
            self._wake.notify()
        return req

    def cancel(self, req: Request) -> None:
        """The client went away: free its slot at the next round (safe to call more than once)."""
        req.cancelled.set()
        with self._wake:
            try:  # a waiting request leaves the queue now, so abandoned requests cannot fill it
                self._waiting.remove(req)
                self.metrics.record_finished("cancelled", len(req.prompt_ids), 0, None, None)
                self.metrics.queued.set(len(self._waiting))
            except ValueError:
                pass  # already admitted or finished: its slot is freed at the next round
            self._wake.notify()

    def status(self) -> dict[str, Any]:
        alive = bool(self._thread and self._thread.is_alive())
        return {"running": len(self._running), "waiting": len(self._waiting),
                "max_running": self.max_running, "engine_alive": alive}

    # --- engine thread -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stop:
                    break
                self._admit()
            self._round()
        for req, gen in self._running:
            self._finish(req, gen, "cancelled")
        self._running.clear()
        self._batcher.close()

    def _admit(self) -> None:
        """Move waiting requests into free slots, dropping those already cancelled (holds _wake)."""
        while self._waiting and len(self._running) < self.max_running:
            req = self._waiting.popleft()
            if req.cancelled.is_set():
                self.metrics.record_finished("cancelled", len(req.prompt_ids), 0, None, None)
                continue
            try:
                gen = Generation(self.handle, req.prompt_ids, req.params, t_submit=req.t_submit)
            except Exception as exc:  # a bad request must never kill the engine thread
                log.exception("cannot start generation")
                req.push(Failed(str(exc)))
                self.metrics.record_finished("error", len(req.prompt_ids), 0, None, None)
                continue
            self._running.append((req, gen))
        self.metrics.active.set(len(self._running))
        self.metrics.queued.set(len(self._waiting))

    def _round(self) -> None:
        """Advance every running request by one token; retire finished and cancelled ones."""
        live: list[tuple[Request, Generation]] = []
        for req, gen in self._running:
            if req.cancelled.is_set():
                self._finish(req, gen, "cancelled")
            else:
                live.append((req, gen))
        outcomes = self._batcher.run([gen.step for _, gen in live])
        still: list[tuple[Request, Generation]] = []
        for (req, gen), delta in zip(live, outcomes, strict=True):
            if isinstance(delta, Exception):  # one bad request must not stop the server
                log.error("generation failed", exc_info=delta)
                req.push(Failed(f"generation failed: {delta}"))
                self._finish(req, gen, "error")
                continue
            if delta:
                req.push(Delta(delta))
            if gen.finished:
                req.push(Done(gen.result()))
                self._finish(req, gen, "completed")
            else:
                still.append((req, gen))
        with self._wake:
            self._running = still
            self.metrics.active.set(len(still))

    def _finish(self, req: Request, gen: Generation, outcome: str) -> None:
        gen.release()
        r = gen.result()
        self.metrics.record_finished(outcome, r.prompt_tokens, r.completion_tokens, r.ttft_s, r.tpot_s)
        log.debug("request finished (%s): %d prompt + %d completion tokens", outcome,
                  r.prompt_tokens, r.completion_tokens)


async def collect(req: Request, gone: Callable[[], Awaitable[bool]] | None = None) -> GenerationResult | None:
    """Wait for a request's end (non-streaming responses); raises ZipMoEError if the engine failed.

    `gone()` is polled every DISCONNECT_POLL_S; when it says the client left, the request is dropped (None).
    """
    next_check = time.monotonic() + DISCONNECT_POLL_S
    while True:
        try:
            event = await asyncio.wait_for(req.events.get(), timeout=DISCONNECT_POLL_S)
        except TimeoutError:
            event = None
        if gone is not None and time.monotonic() >= next_check:
            if await gone():
                return None
            next_check = time.monotonic() + DISCONNECT_POLL_S
        if isinstance(event, Done):
            return event.result
        if isinstance(event, Failed):
            raise ZipMoEError(event.message)
