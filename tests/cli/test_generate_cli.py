"""CLI: generate, chat, serve and demo — happy paths and bad input (exit status 2, one-paragraph error)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tests.serve.tiny_chat import build_tiny_chat_model

from zipmoe.cli.main import main
from zipmoe.convert import convert
from zipmoe.generation import SamplingParams, encode_chat, encode_prompt, generate, load_handle

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_chat_model(tmp_path_factory.mktemp("cli") / "tinychat")
    return path, load_handle(path)


@pytest.fixture(scope="module")
def tiny_store(tiny, tmp_path_factory):
    return convert(tiny[0], tmp_path_factory.mktemp("cli-store") / "tinychat", progress=False, workers=2)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_loading_a_store_shows_a_progress_bar_on_a_terminal_only(tiny, tiny_store, capsys, monkeypatch):
    want = generate(tiny[1], encode_prompt(tiny[1], "the cat"), SamplingParams(max_tokens=4)).text
    args = ["generate", str(tiny_store), "the cat", "--max-tokens", "4"]
    assert main(args) == 0  # stderr is captured, not a terminal: no bar
    out = capsys.readouterr()
    assert out.out == want + "\n" and "loading" not in out.err
    for extra, shown in (([], True), (["--no-progress"], False)):
        terminal = FakeTerminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        assert main(args + extra) == 0
        assert capsys.readouterr().out == want + "\n"
        bar = terminal.getvalue()
        assert ("loading (compiling the decoders)" in bar and "loading (ready)" in bar) == shown, bar
        assert ("loading" in bar) == shown


def test_load_reports_every_stage_in_order(tiny_store):
    calls: list[tuple[str, int, int]] = []
    load_handle(tiny_store, progress=lambda *call: calls.append(call))
    total = calls[0][2]
    assert [c[1] for c in calls] == [*range(total), total] and {c[2] for c in calls} == {total}
    stages = [c[0] for c in calls]
    assert stages[0] == "verifying dense weights" and stages[-2:] == ["building the model", "ready"]
    assert "loading dense weights" in stages and "preloading experts" in stages


def test_generate_prints_greedy_text(tiny, capsys):
    path, handle = tiny
    want = generate(handle, encode_prompt(handle, "the cat"), SamplingParams(max_tokens=12)).text
    assert main(["generate", str(path), "the cat", "--max-tokens", "12"]) == 0
    assert capsys.readouterr().out == want + "\n"


def test_generate_chat_stats_and_stdin(tiny, capsys, monkeypatch):
    path, handle = tiny
    ids = encode_chat(handle, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    want = generate(handle, ids, SamplingParams(max_tokens=10)).text
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi"))
    assert main(["generate", str(path), "-", "--chat", "--system", "be brief", "--max-tokens", "10",
                 "--stats"]) == 0
    out = capsys.readouterr()
    assert out.out == want + "\n"
    assert "prompt +" in out.err and "TTFT" in out.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "/nonexistent/store", "hi"], "not a model directory"),
        (["generate", "{tiny}", "hi", "--temperature", "5"], "--temperature"),
        (["generate", "{tiny}", "   "], "prompt is empty"),
        (["generate", "{tiny}", "word " * 300], "context"),
        (["generate", "{tiny}", "hi", *["--stop", "x"] * 5], "at most 4 stop strings"),
        (["generate", "{tiny}", "hi", "--stop", "x" * 300], "at most 256 characters"),
        (["chat", "/nonexistent/store"], "not a model directory"),
        (["serve", "/nonexistent/store"], "not a model directory"),
        (["serve", "{tiny}", "--api-key", ""], "--api-key"),
    ],
)
def test_bad_input_exits_2_with_message(tiny, capsys, args, message):
    args = [a.replace("{tiny}", str(tiny[0])) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "zipmoe: error" in err and message in err


@pytest.mark.parametrize(
    "args",
    [["generate", "x", "hi", "--max-tokens", "0"], ["serve", "x", "--port", "70000"],
     ["demo", "--memory-budget", "lots"], ["generate"]],
)
def test_usage_errors_exit_2(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_chat_session_streams_and_reports_stats(tiny, capsys, monkeypatch):
    path, handle = tiny
    want = generate(handle, encode_chat(handle, [{"role": "user", "content": "hello"}]),
                    SamplingParams(max_tokens=8)).text
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/stats\n/reset\n/bogus\n/exit\n"))
    assert main(["chat", str(path), "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(want + "\n")
    assert "TTFT" in out and "conversation cleared" in out and "/stats" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_in_process(tiny, monkeypatch, capsys):
    """`zipmoe serve` wiring: flags reach uvicorn, the app answers with the key, then shuts down."""
    import threading

    import uvicorn

    path, handle = tiny
    seen: dict = {}

    def fake_run(app, host, port, log_level):
        seen.update(host=host, port=port)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        body = json.dumps({"model": "tiny", "prompt": "the cat", "max_tokens": 12, "temperature": 0}).encode()
        req = urllib.request.Request(base + "/v1/completions", body,
                                     {"Content-Type": "application/json", "Authorization": "Bearer k1"})
        seen["answer"] = json.loads(urllib.request.urlopen(req, timeout=60).read())
        server.should_exit = True
        thread.join(10)

    monkeypatch.setattr(uvicorn, "run", fake_run)
    assert main(["serve", str(path), "--port", "8123", "--api-key", "k1", "--model-id", "tiny"]) == 0
    want = generate(handle, encode_prompt(handle, "the cat"), SamplingParams(max_tokens=12)).text
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123
    assert seen["answer"]["choices"][0]["text"] == want
    assert "API key required" in capsys.readouterr().out


@pytest.mark.slow
def test_serve_subprocess_answers(tiny):
    path, handle = tiny
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "zipmoe.cli.main", "serve", str(path), "--port", str(port),
                             "--model-id", "tiny"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                urllib.request.urlopen(base + "/health", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        body = json.dumps({"model": "tiny", "prompt": "the cat", "max_tokens": 12, "temperature": 0}).encode()
        req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())
        want = generate(handle, encode_prompt(handle, "the cat"), SamplingParams(max_tokens=12)).text
        assert answer["choices"][0]["text"] == want
    finally:
        proc.terminate()
        proc.wait(20)
