"""Fixtures: a tiny chat model on disk (checkpoint and zipmoe store), its handles, and a live server on a
free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvicorn
from tests.serve.tiny_chat import build_tiny_chat_model

from zipmoe.convert import convert
from zipmoe.errors import BudgetTooSmallError
from zipmoe.generation import ModelHandle, load_handle
from zipmoe.serve.app import create_app
from zipmoe.serve.service import GenerationService

API_KEY = "test-key-123"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "tinychat")


@pytest.fixture(scope="session")
def handle(tiny_dir) -> ModelHandle:
    return load_handle(tiny_dir, device="cpu")


@pytest.fixture(scope="session")
def store_dir(tiny_dir, tmp_path_factory):
    """The tiny chat model converted to a zipmoe store (named like the checkpoint: model id 'tinychat')."""
    return convert(tiny_dir, tmp_path_factory.mktemp("store") / "tinychat", progress=False, workers=2)


@pytest.fixture(scope="session")
def store_handle(store_dir) -> ModelHandle:
    """The store served by the engine under its minimum budget, so experts are loaded, not all cached."""
    budget = 1
    for _ in range(10):  # each error names the minimum for the part that did not fit
        try:
            return load_handle(store_dir, device="cpu", memory_budget=budget, threads=1)
        except BudgetTooSmallError as exc:
            budget = exc.minimum_bytes
    raise AssertionError("no budget found for the tiny store")


class LiveServer:
    """uvicorn in a thread on an OS-chosen port of 127.0.0.1."""

    def __init__(self, handle: ModelHandle, api_key: str | None, max_running: int):
        self.service = GenerationService(handle, max_running=max_running)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(create_app(self.service, api_key), log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(handle) -> Iterator[LiveServer]:
    live = LiveServer(handle, API_KEY, max_running=16)
    yield live
    live.stop()


def stream_chats(make_client: Callable[[], Any], model: str, prompts: list[str], max_tokens: int,
                 join_s: float) -> dict[str, str]:
    """One greedy streaming chat completion per prompt, all at once (a thread each): prompt -> text.
    Raises the first client error."""
    got: dict[str, str] = {}
    errors: list[BaseException] = []

    def one(prompt: str) -> None:
        try:
            s = make_client().chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                temperature=0, stream=True)
            got[prompt] = "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join_s)
    if errors:
        raise errors[0]
    return got
