"""The proxy over TCP: a real gateway process in front of real upstream servers."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.procs import Gateway, MockLLM, free_port
from tests.rawupstream import RawUpstream

POLICY = """
version: 1
upstream: {url: "{upstream}", connect_timeout: 500ms, timeout: 1s}
max_body_bytes: 64KiB
max_header_bytes: 8KiB
"""

StartGateway = Callable[..., Gateway]


@pytest.fixture
def gw(start_gateway: StartGateway, mock_llm: MockLLM) -> Gateway:
    return start_gateway(POLICY, mock_llm.url)


@pytest.fixture(scope="module")
def raw_upstream() -> Iterator[RawUpstream]:
    up = RawUpstream().start()
    yield up
    up.stop()


def assert_error(resp: httpx.Response, status: int, type_: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"]["type"] == type_
    assert body["error"]["request_id"] == resp.headers["x-request-id"]
    assert resp.headers["content-type"] == "application/json"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_methods_path_and_query_forwarded(gw: Gateway, method: str) -> None:
    resp = httpx.request(method, f"{gw.url}/echo/a/b?x=1&y=%20z&x=2&empty=", content=b"hi")
    assert resp.status_code == 200
    echo = resp.json()
    assert echo["method"] == method
    assert echo["path"] == "/echo/a/b"
    assert echo["query_string"] == "x=1&y=%20z&x=2&empty="
    assert echo["body_len"] == 2


def test_head(gw: Gateway) -> None:
    resp = httpx.head(f"{gw.url}/echo/x")
    assert resp.status_code == 200 and resp.content == b""


def test_binary_body_roundtrip(gw: Gateway) -> None:
    body = os.urandom(60_000)
    echo = httpx.post(f"{gw.url}/echo/bin", content=body).json()
    assert echo["body_len"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_chunked_request_body_is_streamed(gw: Gateway) -> None:
    parts = [os.urandom(10_000) for _ in range(5)]

    def gen() -> Iterator[bytes]:
        yield from parts

    echo = httpx.post(f"{gw.url}/echo/chunked", content=gen()).json()
    assert echo["body_sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()
    assert "transfer-encoding" in echo["headers"] or "content-length" in echo["headers"]


def test_header_hygiene_and_forwarded_headers(gw: Gateway) -> None:
    resp = httpx.get(
        f"{gw.url}/echo/h",
        headers={
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "secret",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "X-Forwarded-For": "6.6.6.6",
            "X-Forwarded-Host": "evil.example",
            "X-Custom": "kept",
        },
    )
    seen = resp.json()["headers"]
    for name in ["x-hop", "keep-alive", "te", "proxy-authorization"]:
        assert name not in seen, name
    assert seen["x-custom"] == "kept"
    assert seen["x-forwarded-for"] == "127.0.0.1"  # the peer is not a trusted proxy
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == f"127.0.0.1:{gw.port}"
    assert seen["x-request-id"] == resp.headers["x-request-id"]


def test_request_id_kept_when_sane_and_replaced_when_not(gw: Gateway) -> None:
    resp = httpx.get(f"{gw.url}/echo/r", headers={"X-Request-ID": "abc-123"})
    assert resp.headers["x-request-id"] == "abc-123"
    assert resp.json()["headers"]["x-request-id"] == "abc-123"
    resp = httpx.get(f"{gw.url}/echo/r", headers={"X-Request-ID": "bad id <x>" * 20})
    rid = resp.headers["x-request-id"]
    assert len(rid) == 32 and resp.json()["headers"]["x-request-id"] == rid


def test_body_too_large_by_length_and_by_stream(gw: Gateway) -> None:
    resp = httpx.post(f"{gw.url}/echo/big", content=b"x" * (64 * 1024 + 1))
    assert_error(resp, 413, "body_too_large")

    def gen() -> Iterator[bytes]:
        for _ in range(20):
            yield b"y" * 8192

    assert_error(httpx.post(f"{gw.url}/echo/big", content=gen()), 413, "body_too_large")
    assert gw.metric("gateway_request_errors_total", {"type": "body_too_large"}) == 2
    # the gateway still serves afterwards
    assert httpx.get(f"{gw.url}/echo/ok").status_code == 200


def test_headers_too_large(gw: Gateway) -> None:
    resp = httpx.get(f"{gw.url}/echo/h", headers={"X-Big": "a" * 9000})
    assert_error(resp, 431, "headers_too_large")


def test_dot_segments_refused(gw: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        s.sendall(b"GET /echo/../admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400")
    assert b'"invalid_request"' in data


def test_sse_arrives_incrementally(gw: Gateway) -> None:
    body = {
        "model": "m",
        "stream": True,
        "messages": [{"role": "user", "content": "one two three four five six"}],
    }
    arrivals: list[float] = []
    start = time.monotonic()
    with httpx.stream(
        "POST", f"{gw.url}/v1/chat/completions", json=body, headers={"X-Mock-Latency": "0.15"}
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        for _ in resp.iter_raw():
            arrivals.append(time.monotonic() - start)
    assert len(arrivals) >= 5
    # buffered to the end, everything would arrive at once after ~1 s
    assert arrivals[-1] - arrivals[0] > 0.6


def test_upstream_refused_is_502(start_gateway: StartGateway) -> None:
    gw = start_gateway(POLICY, f"http://127.0.0.1:{free_port()}")
    assert_error(httpx.get(f"{gw.url}/x"), 502, "upstream_unavailable")
    assert gw.metric("gateway_upstream_errors_total", {"kind": "refused"}) == 1
    ready = httpx.get(f"{gw.admin}/readyz")
    assert ready.status_code == 503 and "upstream" in ready.json()["failing"]


def test_upstream_connect_timeout_is_503(start_gateway: StartGateway) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = []
    for _ in range(5):  # fill the accept backlog so further SYNs go unanswered
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        filler.append(c)
    try:
        gw = start_gateway(POLICY, f"http://127.0.0.1:{port}")
        started = time.monotonic()
        assert_error(httpx.get(f"{gw.url}/x", timeout=10), 503, "upstream_connect_timeout")
        assert time.monotonic() - started < 3
    finally:
        for c in filler:
            c.close()
        listener.close()


def test_upstream_read_timeout_is_504(
    start_gateway: StartGateway, raw_upstream: RawUpstream
) -> None:
    gw = start_gateway(POLICY, raw_upstream.url)
    started = time.monotonic()
    assert_error(httpx.get(f"{gw.url}/slow", timeout=10), 504, "upstream_timeout")
    assert time.monotonic() - started < 3


def test_upstream_garbage_is_502(start_gateway: StartGateway, raw_upstream: RawUpstream) -> None:
    gw = start_gateway(POLICY, raw_upstream.url)
    resp = httpx.get(f"{gw.url}/garbage")
    assert resp.status_code == 502 and resp.json()["error"]["type"].startswith("upstream_")


def test_upstream_short_body_is_502(start_gateway: StartGateway, raw_upstream: RawUpstream) -> None:
    gw = start_gateway(POLICY, raw_upstream.url)
    assert_error(httpx.get(f"{gw.url}/short"), 502, "upstream_reset")
    assert "Traceback" not in gw.log()


def test_upstream_reset_mid_stream_ends_client_stream(
    start_gateway: StartGateway, raw_upstream: RawUpstream
) -> None:
    gw = start_gateway(POLICY, raw_upstream.url)
    with httpx.stream("GET", f"{gw.url}/reset", timeout=5) as resp:
        assert resp.status_code == 200
        data = b"".join(resp.iter_raw())  # no exception: a clean end of the chunked body
    assert data == b"data: first\n\ndata: second\n\n"
    assert httpx.get(f"{gw.url}/ok").text == "ok"
    assert gw.metric("gateway_upstream_errors_total", {"kind": "reset"}) >= 1
    assert "Traceback" not in gw.log()


def test_admin_endpoints(gw: Gateway) -> None:
    assert httpx.get(f"{gw.admin}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{gw.admin}/readyz").json() == {"status": "ready"}
    metrics = httpx.get(f"{gw.admin}/metrics")
    assert "gateway_requests_in_flight" in metrics.text
    assert httpx.get(f"{gw.admin}/v1/chat/completions").status_code == 404
    # the admin endpoints are not on the client listener: they go upstream like any path
    assert httpx.get(f"{gw.url}/metrics").status_code == 404
