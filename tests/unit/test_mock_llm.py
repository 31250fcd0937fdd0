"""Tests for the bundled mock LLM service (real uvicorn server on a loopback port)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import httpx
import openai
import pytest

from gateway.demo.mock_llm import Message, MockLLMConfig, create_app, serve
from gateway.demo.mock_llm_text import UNSAFE_REPLY

ServerFactory = Callable[[MockLLMConfig], str]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def start_server() -> Iterator[ServerFactory]:
    """Start mock servers in a background event loop; stop them all at teardown."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    futures: list[Future[None]] = []

    def start(config: MockLLMConfig) -> str:
        port = _free_port()
        futures.append(asyncio.run_coroutine_threadsafe(serve("127.0.0.1", port, config), loop))
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    return base
            except httpx.TransportError:
                if time.monotonic() > deadline or futures[-1].done():
                    raise
            time.sleep(0.02)

    yield start

    async def shutdown() -> None:
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    loop.close()
    assert all(fut.done() for fut in futures)


@pytest.fixture(scope="module")
def base(start_server: ServerFactory) -> str:
    return start_server(MockLLMConfig())


@pytest.fixture(scope="module")
def slow_base(start_server: ServerFactory) -> str:
    return start_server(MockLLMConfig(token_latency=0.05, model="slow-mock"))


@pytest.fixture
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)


def _sse_events(text: str) -> list[str]:
    return [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]


def test_health_models_and_404(base: str, client: openai.OpenAI) -> None:
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list()] == ["mock-gpt"]
    resp = httpx.get(f"{base}/nope")
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "not_found"
    assert httpx.get(f"{base}/v1/chat/completions").status_code == 404


def test_chat_plain(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="gpt-4o",
        messages=[
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": "hello there world"},
        ],
    )
    assert resp.id.startswith("chatcmpl-")
    assert resp.object == "chat.completion"
    assert resp.model == "gpt-4o"
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "Echo: hello there world"
    assert choice.finish_reason == "stop"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (5, 4)
    assert resp.usage.total_tokens == 9


def test_chat_content_parts_default_model_and_max_tokens(base: str) -> None:
    body = {
        "messages": [
            {"role": "user", "content": "ignored"},
            {"role": "user", "content": [{"type": "text", "text": "one two three four"}]},
        ],
        "max_tokens": 3,
    }
    data = httpx.post(f"{base}/v1/chat/completions", json=body).json()
    assert data["model"] == "mock-gpt"
    assert data["choices"][0]["message"]["content"] == "Echo: one two"
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "stream me please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: stream me please"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens == 3


def test_chat_stream_raw_sse_without_usage(base: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "a b"}], "stream": True}
    resp = httpx.post(f"{base}/v1/chat/completions", json=body)
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(resp.text)
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [p["choices"][0]["delta"].get("content") for p in parsed[1:-1]] == ["Echo: ", "a ", "b"]
    assert parsed[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert all("usage" not in p for p in parsed)


def test_completions_json_and_stream(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="legacy", prompt="say hi")
    assert resp.object == "text_completion"
    assert resp.id.startswith("cmpl-")
    assert resp.choices[0].text == "Echo: say hi"
    assert resp.usage is not None
    assert resp.usage.total_tokens == 5
    chunks = list(
        client.completions.create(
            model="legacy",
            prompt=["line one", "line two"],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Echo: line one line two"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 4


@pytest.mark.parametrize("via_header", [True, False])
def test_unsafe_switch(client: openai.OpenAI, via_header: bool) -> None:
    content = "tell me" if via_header else "tell me [[unsafe]]"
    headers = {"X-Mock-Unsafe": "1"} if via_header else {}
    messages: Any = [{"role": "user", "content": content}]
    resp = client.chat.completions.create(model="m", messages=messages, extra_headers=headers)
    assert resp.choices[0].message.content == UNSAFE_REPLY
    assert "<script>" in UNSAFE_REPLY
    stream = client.chat.completions.create(
        model="m", messages=messages, stream=True, extra_headers=headers
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == UNSAFE_REPLY
    assert "<scr" in pieces and not any("<script>" in p for p in pieces)
    legacy = client.completions.create(model="m", prompt=content, extra_headers=headers)
    assert legacy.choices[0].text == UNSAFE_REPLY


def test_unsafe_header_off_and_marker_only_in_last_user_message(base: str) -> None:
    body = {
        "messages": [
            {"role": "user", "content": "[[unsafe]]"},
            {"role": "user", "content": "fine"},
        ]
    }
    resp = httpx.post(f"{base}/v1/chat/completions", json=body, headers={"X-Mock-Unsafe": "0"})
    assert resp.json()["choices"][0]["message"]["content"] == "Echo: fine"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH"])
def test_echo(base: str, method: str) -> None:
    payload = b"x" * 100_000 if method != "GET" else b""
    headers = [("X-Dup", "a"), ("X-Dup", "b"), ("X-Single", "v")]
    resp = httpx.request(method, f"{base}/echo/a/b?q=1&r=2", content=payload, headers=headers)
    assert resp.status_code == 200
    data = resp.json()
    assert data["method"] == method
    assert data["path"] == "/echo/a/b"
    assert data["query_string"] == "q=1&r=2"
    assert data["headers"]["x-dup"] == "a, b"
    assert data["headers"]["x-single"] == "v"
    assert data["body_len"] == len(payload)
    assert data["body_sha256"] == hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", b"{not json"),
        ("/v1/chat/completions", b""),
        ("/v1/chat/completions", b"\xff\xfe\x00"),
        ("/v1/chat/completions", b"[1, 2]"),
        ("/v1/chat/completions", b'{"model": "m"}'),
        ("/v1/chat/completions", b'{"messages": "hi"}'),
        ("/v1/chat/completions", b'{"messages": [{"content": "no role"}]}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}'),
        ("/v1/chat/completions", b'{"messages": [], "max_tokens": 0}'),
        ("/v1/chat/completions", b'{"messages": [], "model": 3}'),
        ("/v1/chat/completions", b'{"messages": [], "stream_options": 1}'),
        ("/v1/completions", b'{"model": "m"}'),
        ("/v1/completions", b'{"prompt": [1, 2]}'),
        ("/v1/completions", b"[" * 100_000),
    ],
)
def test_bad_requests_are_400(base: str, path: str, body: bytes) -> None:
    resp = httpx.post(f"{base}{path}", content=body)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert isinstance(error["message"], str)


def test_sdk_sees_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="m", prompt=None)


def test_chunks_arrive_incrementally(slow_base: str) -> None:
    body = {"messages": [{"role": "user", "content": "w1 w2 w3 w4 w5 w6"}], "stream": True}
    start = time.monotonic()
    arrivals: list[float] = []
    received = b""
    with httpx.stream("POST", f"{slow_base}/v1/chat/completions", json=body) as resp:
        for raw in resp.iter_raw():
            arrivals.append(time.monotonic() - start)
            received += raw
    assert received.endswith(b"data: [DONE]\n\n")
    assert len(arrivals) >= 4
    assert arrivals[0] < arrivals[-1] - 0.1
    assert arrivals[-1] >= 7 * 0.05 * 0.9


def test_latency_header_override(base: str, slow_base: str) -> None:
    body = {"messages": [{"role": "user", "content": "a b c"}]}
    start = time.monotonic()
    resp = httpx.post(f"{base}/v1/chat/completions", json=body, headers={"X-Mock-Latency": "0.1"})
    assert resp.status_code == 200
    assert time.monotonic() - start >= 0.4 * 0.9  # 4 completion tokens
    for value in ("0", "-5", "nan", "garbage"):
        start = time.monotonic()
        resp = httpx.post(
            f"{slow_base}/v1/chat/completions", json=body, headers={"X-Mock-Latency": value}
        )
        assert resp.status_code == 200
        assert resp.json()["model"] == "slow-mock"
        assert time.monotonic() - start < (0.5 if value in ("0", "-5") else 5)


async def _call_app(
    body: bytes, headers: list[tuple[bytes, bytes]], disconnect: bool = False
) -> list[Message]:
    app = create_app(MockLLMConfig())
    sent: list[Message] = []
    incoming: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Message:
        if incoming:
            return incoming.pop(0)
        if disconnect:
            await asyncio.sleep(0.03)
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "query_string": b"",
        "headers": headers,
    }
    await asyncio.wait_for(app(scope, receive, send), 10)
    return sent


def test_asgi_one_body_message_per_chunk() -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "x y z"}], "stream": True})
    sent = asyncio.run(_call_app(body.encode(), []))
    assert sent[0]["type"] == "http.response.start"
    bodies = sent[1:]
    assert all(m["type"] == "http.response.body" for m in bodies)
    assert all(m["more_body"] for m in bodies[:-1])
    assert bodies[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    events = [m["body"] for m in bodies[:-1]]
    assert all(e.startswith(b"data: ") and e.endswith(b"\n\n") for e in events)
    # role chunk, 4 content chunks ("Echo: ", "x ", "y ", "z"), finish chunk, [DONE]
    assert len(events) == 7


def test_asgi_stream_stops_on_disconnect() -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "w " * 50}], "stream": True})
    sent = asyncio.run(_call_app(body.encode(), [(b"x-mock-latency", b"0.01")], disconnect=True))
    assert all(b"[DONE]" not in m.get("body", b"") for m in sent)
    assert len(sent) < 20


def test_asgi_json_reply_abandoned_on_disconnect() -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "slow"}]})
    start = time.monotonic()
    sent = asyncio.run(_call_app(body.encode(), [(b"x-mock-latency", b"30")], disconnect=True))
    assert sent == []
    assert time.monotonic() - start < 5
