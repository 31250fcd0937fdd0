"""Resource bounds over TCP: connection and in-flight caps (clean 503), header and body read
timeouts (408 or a silent close), and memory per request that does not follow the body size."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.hardening.helpers import parse_answer, wait_until
from tests.procs import Gateway, MockLLM

StartGateway = Callable[..., Gateway]


def policy(**fields: Any) -> str:
    extra = "".join(f"{k}: {v}\n" for k, v in fields.items())
    return 'version: 1\nupstream: {url: "{upstream}", timeout: 10s}\n' + extra


def connect(gw: Gateway) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    return s


def read_all(s: socket.socket, timeout: float = 10.0) -> bytes:
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def read_one(s: socket.socket) -> bytes:
    """One Content-Length framed answer from a kept-alive connection."""
    s.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    answer = parse_answer(data)
    head_len = data.index(b"\r\n\r\n") + 4
    while len(data) < head_len + int(answer.headers["content-length"]):
        data += s.recv(65536)
    return data


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_connection_cap_answers_503_json_and_recovers(
    start_gateway: StartGateway, mock_llm: MockLLM
) -> None:
    gw = start_gateway(policy(max_connections=5), mock_llm.url)
    held = [connect(gw) for _ in range(5)]
    try:
        time.sleep(0.2)  # the server has accepted them all
        with connect(gw) as extra:
            extra.sendall(b"GET /echo/x HTTP/1.1\r\nHost: x\r\nX-Request-ID: over-1\r\n\r\n")
            answer = parse_answer(read_all(extra))
        assert answer.status == 503
        assert answer.headers["retry-after"] == "1"
        assert answer.headers["connection"] == "close"
        err = answer.error()
        assert err["type"] == "overloaded" and err["request_id"] == "over-1"
        # a connection over the cap that sends nothing is dropped after a short grace
        with connect(gw) as idle:
            started = time.monotonic()
            assert read_all(idle) == b""
            assert time.monotonic() - started < 3
    finally:
        for s in held:
            s.close()
    wait_until(lambda: httpx.get(f"{gw.url}/echo/x").status_code == 200, 2, "served again")
    assert gw.metric("gateway_request_errors_total", {"type": "overloaded"}) == 2


def test_in_flight_cap_sheds_with_503_retry_after(
    start_gateway: StartGateway, mock_llm: MockLLM
) -> None:
    gw = start_gateway(policy(max_in_flight=3), mock_llm.url)
    body = {"model": "m", "messages": [{"role": "user", "content": "a b c d"}]}
    results: list[int] = []

    def slow() -> None:
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=body,
                       headers={"X-Mock-Latency": "0.5"}, timeout=20)  # fmt: skip
        results.append(r.status_code)

    threads = [threading.Thread(target=slow) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: gw.metric("gateway_requests_in_flight") == 3, 5, "3 in flight")
    resp = httpx.get(f"{gw.url}/echo/x", headers={"X-Request-ID": "shed-1"})
    assert resp.status_code == 503, resp.text
    assert resp.headers["retry-after"] == "1"
    assert resp.json()["error"] == {
        "type": "overloaded",
        "message": "the gateway is handling as many requests as it may; retry later",
        "request_id": "shed-1",
    }
    for t in threads:
        t.join(20)
    assert results == [200, 200, 200]
    assert httpx.get(f"{gw.url}/echo/x").status_code == 200
    assert gw.metric("gateway_request_errors_total", {"type": "overloaded"}) == 1


def test_header_read_timeout(start_gateway: StartGateway, mock_llm: MockLLM) -> None:
    gw = start_gateway(policy(header_read_timeout="1s"), mock_llm.url)
    with connect(gw) as idle, connect(gw) as partial:
        started = time.monotonic()
        partial.sendall(b"GET /echo/x HTTP/1.1\r\nHost: x\r\nX-Request-ID: slow-1\r\n")
        answer = parse_answer(read_all(partial))
        took = time.monotonic() - started
        assert answer.status == 408 and answer.error()["type"] == "request_timeout"
        assert answer.error()["request_id"] != "slow-1"  # the head never completed
        assert 0.9 <= took < 2.5, took
        assert read_all(idle) == b""  # never sent a byte: closed without an answer
        assert time.monotonic() - started < 2.5
    # on a kept-alive connection, the clock starts at the next request's first byte
    with connect(gw) as s:
        s.sendall(b"GET /echo/x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_one(s).startswith(b"HTTP/1.1 200")
        time.sleep(1.5)  # idle past header_read_timeout (keep-alive allows 5 s)
        s.sendall(b"GET /echo/y HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_one(s).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /echo/z HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        rest = read_all(s)
        assert rest.startswith(b"HTTP/1.1 408"), rest[:200]
        assert 0.9 <= time.monotonic() - started < 2.5
    assert gw.metric("gateway_request_errors_total", {"type": "request_timeout"}) == 3


@pytest.mark.parametrize("path", ["/echo/stream", "/v1/chat/completions"])
def test_body_read_timeout(start_gateway: StartGateway, mock_llm: MockLLM, path: str) -> None:
    # /echo streams the body upstream; the chat route buffers it for the input guardrail.
    gw = start_gateway(
        policy(body_read_timeout="1s")
        + "routes:\n  - name: chat\n    path: /v1/chat\n"
        + "    guardrails: {input: {format: openai, rules: [prompt-injection]}}\n",
        mock_llm.url,
    )
    with connect(gw) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                  "X-Request-ID: stall-1\r\n\r\n{\"mod".encode())  # fmt: skip
        started = time.monotonic()
        answer = parse_answer(read_all(s))
        assert answer.status == 408
        err = answer.error()
        assert err["type"] == "request_timeout" and err["request_id"] == "stall-1"
        assert 0.9 <= time.monotonic() - started < 2.5
    # a slow but steady body is fine: the timeout is between two pieces, not for the whole
    content = b'{"model":"m","messages":[{"role":"user","content":"hello there"}]}'

    def trickle() -> Iterator[bytes]:
        for i in range(0, len(content), 16):
            time.sleep(0.4)
            yield content[i : i + 16]

    resp = httpx.post(f"{gw.url}{path}", content=trickle(), timeout=20)
    assert resp.status_code == 200, resp.text
    assert gw.metric("gateway_request_errors_total", {"type": "request_timeout"}) == 1
    assert gw.metric("gateway_request_errors_total", {"type": "body_too_large"}) == 0
    assert "Traceback" not in gw.log()


def test_memory_per_request_does_not_follow_the_body(
    start_gateway: StartGateway, mock_llm: MockLLM
) -> None:
    gw = start_gateway(policy(max_body_bytes="256MiB"), mock_llm.url)
    chunk = os.urandom(1024 * 1024)
    httpx.post(f"{gw.url}/echo/warm", content=chunk)  # pools and buffers exist
    before = rss_kib(gw.popen.pid)

    def body(n: int) -> Iterator[bytes]:
        for _ in range(n):
            yield chunk

    # 128 MiB streamed through: the gateway holds a few chunks at a time, not the body
    echo = httpx.post(f"{gw.url}/echo/big", content=body(128), timeout=120).json()
    assert echo["body_len"] == 128 * 1024 * 1024
    grown = rss_kib(gw.popen.pid) - before
    assert grown < 32 * 1024, f"RSS grew {grown} KiB for a 128 MiB body"
    print(f"\nRSS growth for a 128 MiB streamed body: {grown} KiB")


def test_oversized_stream_is_cut_at_the_limit(
    start_gateway: StartGateway, mock_llm: MockLLM
) -> None:
    gw = start_gateway(policy(max_body_bytes="1MiB"), mock_llm.url)
    sent = 0
    chunk = b"x" * (256 * 1024)

    def body() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(400):  # 100 MiB offered
            sent += len(chunk)
            yield chunk

    try:
        resp = httpx.post(f"{gw.url}/echo/big", content=body(), timeout=30)
        assert resp.status_code == 413 and resp.json()["error"]["type"] == "body_too_large"
    except httpx.WriteError:
        pass  # the gateway answered and closed while the client was still sending
    assert sent < 100 * 1024 * 1024, "the gateway read the whole oversized body"
    assert httpx.get(f"{gw.url}/echo/x").status_code == 200


def test_an_early_answer_keeps_the_connection_it_did_not_close(
    start_gateway: StartGateway, mock_llm: MockLLM
) -> None:
    """A 413 sent before the body arrived does not say ``connection: close``, so the client
    may send its next request on the connection: the rest of a small body is read and
    dropped and that request is answered (closing instead lost it: a RemoteProtocolError
    under load)."""
    gw = start_gateway(policy(max_body_bytes=100), mock_llm.url)
    with connect(gw) as s:
        s.sendall(b"POST /echo/x HTTP/1.1\r\nHost: x\r\nContent-Length: 600\r\n\r\n")
        first = read_one(s)
        assert first.startswith(b"HTTP/1.1 413 ") and b"connection: close" not in first.lower()
        time.sleep(0.1)  # the answer is out before the body arrives
        s.sendall(b"a" * 600)
        s.sendall(b"GET /echo/y HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_one(s).startswith(b"HTTP/1.1 200 ")


def test_a_stalled_small_body_never_reaches_the_upstream(start_gateway: StartGateway) -> None:
    # Bodies up to 64 KiB with a Content-Length are read whole first: a slow client holds no
    # upstream connection (a slow-body attack is not amplified onto the service).
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    upstream = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        gw = start_gateway(policy(body_read_timeout="1s"), upstream)
        with connect(gw) as s:
            s.sendall(b"POST /echo/x HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\nab")
            with pytest.raises(TimeoutError):
                listener.accept()[0].close()  # nothing connects upstream meanwhile
            answer = parse_answer(read_all(s))
        assert answer.status == 408 and answer.error()["type"] == "request_timeout"
        with pytest.raises(TimeoutError):
            listener.accept()[0].close()
    finally:
        listener.close()
