"""The OpenAI-compatible server, driven by the official `openai` client over loopback."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.serve.conftest import API_KEY, LiveServer, stream_chats

from zipmoe.generation import SamplingParams, encode_chat, encode_prompt, generate

MODEL = "tinychat"


def client(server, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def http(server, path: str, body: bytes | None = None, key: str | None = API_KEY) -> tuple[int, dict | str]:
    """A raw request (for bodies the openai client refuses to send); returns (status, parsed body)."""
    req = urllib.request.Request(server.url + path, data=body, method="POST" if body is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def expected_chat(handle, content: str, max_tokens: int) -> str:
    ids = encode_chat(handle, [{"role": "user", "content": content}])
    return generate(handle, ids, SamplingParams(max_tokens=max_tokens)).text


def assert_serving(server) -> None:
    out = client(server).completions.create(model=MODEL, prompt="ok", max_tokens=2, temperature=0)
    assert out.usage.completion_tokens >= 1


def test_models_and_health(server):
    assert [m.id for m in client(server).models.list().data] == [MODEL]
    status, body = http(server, "/health", key=None)
    assert status == 200 and body["status"] == "ok" and body["engine_alive"]


def test_chat_greedy_equals_generate(server, handle):
    want = expected_chat(handle, "Hello there", 24)
    out = client(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=24, temperature=0)
    assert out.choices[0].message.content == want
    prompt_len = len(encode_chat(handle, [{"role": "user", "content": "Hello there"}]))
    assert out.usage.prompt_tokens == prompt_len
    assert out.usage.total_tokens == prompt_len + out.usage.completion_tokens
    assert out.choices[0].finish_reason in ("stop", "length")


def test_chat_stream_equals_nonstream(server, handle):
    want = expected_chat(handle, "the cat sat", 30)
    stream = client(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "the cat sat"}], max_tokens=30, temperature=0,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_completions_stream_and_not(server, handle):
    ids = encode_prompt(handle, "the mat")
    want = generate(handle, ids, SamplingParams(max_tokens=20)).text
    c = client(server)
    out = c.completions.create(model=MODEL, prompt="the mat", max_tokens=20, temperature=0)
    assert out.choices[0].text == want and out.usage.prompt_tokens == len(ids)
    streamed = "".join(ch.choices[0].text for ch in
                       c.completions.create(model=MODEL, prompt="the mat", max_tokens=20, temperature=0,
                                            stream=True) if ch.choices)
    assert streamed == want


def test_stop_and_seed(server, handle):
    c = client(server)
    full = c.completions.create(model=MODEL, prompt="a", max_tokens=20, temperature=0).choices[0].text
    stop = full[5:7]
    assert stop, "the tiny model produced too little text for this test"
    out = c.completions.create(model=MODEL, prompt="a", max_tokens=20, temperature=0, stop=[stop])
    assert out.choices[0].text == full[: full.index(stop)] and out.choices[0].finish_reason == "stop"
    kw = dict(model=MODEL, prompt="a", max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    assert c.completions.create(**kw).choices[0].text == c.completions.create(**kw).choices[0].text


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b'{"model": "tinychat", "messages": [', 400, None),  # malformed JSON
        (b'{"model": "other", "prompt": "hi"}', 404, "model"),
        (b'{"model": "tinychat", "prompt": "hi", "max_tokens": -5}', 400, "max_tokens"),
        (b'{"model": "tinychat", "prompt": "hi", "max_tokens": 100000000}', 400, "max_tokens"),
        (b'{"model": "tinychat", "prompt": "hi", "temperature": 9}', 400, "temperature"),
        (b'{"model": "tinychat"}', 400, "prompt"),
        (b'{"model": "tinychat", "prompt": ""}', 400, "prompt"),  # no tokens at all
        (b'{"model": "tinychat", "prompt": "hi", "seed": 1180591620717411303424}', 400, "seed"),  # 2**70
        (b'{"model": "tinychat", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
        (b'{"model": "tinychat", "prompt": "hi", "stop": "' + b"x" * 257 + b'"}', 400, "stop"),
        (b'{"model": "tinychat", "messages": [{"role": "user", "content": "hi"}], "stop": ["ok", "'
         + b"y" * 300 + b'"]}', 400, "stop"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, param):
    path = "/v1/chat/completions" if b'"messages": [{' in body else "/v1/completions"
    got, err = http(server, path, body)
    assert got == status, err
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
    assert err["error"]["param"] == param
    if param == "stop":
        assert "at most" in err["error"]["message"]
    assert_serving(server)


def test_client_errors_via_openai(server):
    c = client(server)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model=MODEL, prompt="word " * 200, max_tokens=5)
    assert info.value.code == "context_length_exceeded" and info.value.param == "prompt"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=0)
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    status, err = http(server, "/v1/models", key=None)
    assert status == 401 and err["error"]["code"] == "invalid_api_key"
    assert_serving(server)


def metric_value(server, name: str, labels: dict | None = None) -> float:
    _, text = http(server, "/metrics", key=None)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and (labels is None or all(s.labels.get(k) == v for k, v in labels.items())):
                return s.value
    return 0.0


class SlowModel:
    """Delegates to the model but takes 20 ms per forward, so a generation outlives a disconnect check."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        time.sleep(0.02)
        return self.model(*args, **kwargs)


def test_disconnect_mid_stream_frees_slot(handle):
    live = LiveServer(dataclasses.replace(handle, model=SlowModel(handle.model)), api_key=None, max_running=1)
    try:
        c = client(live, key="none")
        stream = c.completions.create(model=MODEL, prompt="the", max_tokens=200, temperature=0, stream=True)
        first = next(iter(stream))
        assert first.choices
        stream.close()  # the client goes away mid-stream
        deadline = time.monotonic() + 30
        while metric_value(live, "zipmoe_requests_total", {"outcome": "cancelled"}) < 1:
            assert time.monotonic() < deadline, "cancelled request never freed its slot"
            time.sleep(0.05)
        _, health = http(live, "/health", key=None)
        assert health["running"] == 0
        # the only slot is free again: a new request completes
        assert_serving(live)
        # a non-streaming client that hangs up is dropped too
        body = json.dumps({"model": MODEL, "prompt": "the", "max_tokens": 200, "temperature": 0}).encode()
        with socket.create_connection(("127.0.0.1", live.port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            while metric_value(live, "zipmoe_requests_running") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        while metric_value(live, "zipmoe_requests_total", {"outcome": "cancelled"}) < 2:
            assert time.monotonic() < deadline + 30, "hung-up non-streaming request kept its slot"
            time.sleep(0.05)
        assert metric_value(live, "zipmoe_requests_total", {"outcome": "completed"}) == 1  # assert_serving
    finally:
        live.stop()


def test_sixteen_concurrent_streams(server, handle):
    prompts = [f"the cat {i}" for i in range(16)]
    want = {p: expected_chat(handle, p, 12) for p in prompts}
    assert stream_chats(lambda: client(server), MODEL, prompts, 12, 120) == want


def test_metrics_parse(server):
    client(server).completions.create(model=MODEL, prompt="metrics", max_tokens=4, temperature=0)
    _, text = http(server, "/metrics", key=None)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "zipmoe_time_to_first_token_seconds" in families
    assert metric_value(server, "zipmoe_time_to_first_token_seconds_count") >= 1
    assert metric_value(server, "zipmoe_completion_tokens_total") >= 4


def test_server_matches_zipmoe_generate_cli(server, tiny_dir, capsys):
    from zipmoe.cli.main import main

    assert main(["generate", str(tiny_dir), "Hello there", "--chat", "--max-tokens", "20"]) == 0
    cli_text = capsys.readouterr().out[:-1]  # drop the final newline
    out = client(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=20, temperature=0)
    assert out.choices[0].message.content == cli_text
    assert main(["generate", str(tiny_dir), "the cat", "--max-tokens", "20"]) == 0
    cli_text = capsys.readouterr().out[:-1]
    out = client(server).completions.create(model=MODEL, prompt="the cat", max_tokens=20, temperature=0)
    assert out.choices[0].text == cli_text


def test_queue_with_one_slot_serves_everyone_in_order(handle):
    live = LiveServer(handle, api_key=None, max_running=1)
    try:
        prompts = [f"q{i}" for i in range(5)]
        want = {p: expected_chat(handle, p, 6) for p in prompts}
        got: dict[str, str] = {}

        def one(prompt: str) -> None:
            out = client(live, key="none").chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=6, temperature=0)
            got[prompt] = out.choices[0].message.content

        threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert got == want
        assert metric_value(live, "zipmoe_requests_total", {"outcome": "completed"}) == 5
    finally:
        live.stop()
