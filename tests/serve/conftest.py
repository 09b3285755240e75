"""Fixtures: a tiny chat model on disk (checkpoint and zipmoe store), its handles, and a live server on a
free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

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
