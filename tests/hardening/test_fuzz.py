"""Property-based fuzzing (hypothesis) of paths, headers, query strings, JSON bodies and
unicode through the real server over TCP.

Properties: never a 5xx, never a hang; every answer the gateway makes itself (no ``server``
header: the upstream's uvicorn sends one, the gateway never does) is the JSON error shape with
the request id; an unparsable request gets a 400 or a closed connection; the gateway serves
normally after each property. Examples per property are bounded so the suite stays quick.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hardening.helpers import RawAnswer, parse_answer
from tests.procs import Gateway, MockLLM

POLICY = """
version: 1
upstream: {url: "{upstream}", timeout: 5s}
max_body_bytes: 64KiB
max_header_bytes: 8KiB
telemetry: {access_log: false}
routes:
  - name: chat
    path: /v1/chat
    guardrails:
      input: {format: openai, max_chars: 4000, query_params: ["*"], rules: [prompt-injection]}
      output: {rules: [unsafe-markup]}
"""

FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, mock_llm: MockLLM) -> Iterator[Gateway]:
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "policy.yaml"
    path.write_text(POLICY.replace("{upstream}", mock_llm.url))
    gateway = Gateway(path, folder / "gateway.log")
    yield gateway
    gateway.stop()
    log = gateway.log_path.read_text(errors="replace")
    assert "Traceback" not in log and '"internal_error"' not in log, log[-5000:]


def exchange(port: int, data: bytes, timeout: float = 10.0) -> RawAnswer | None:
    """Send ``data`` (which asks for ``Connection: close``) and read one answer; None when
    the server closed the connection without answering. A hang fails."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with contextlib.suppress(OSError):  # refused and closed before reading everything
            s.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while True:
            assert time.monotonic() < deadline, f"no answer within {timeout}s to {data[:200]!r}"
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                break
            out += chunk
    return parse_answer(out) if out else None


def judge(answer: RawAnswer | None, request: bytes) -> None:
    """The fuzz oracle: below 500, and the gateway's own answers in the JSON shape."""
    if answer is None:
        return  # a closed connection is an allowed answer to an unparsable request
    assert answer.status < 500, (answer, request[:300])
    if answer.status >= 400 and "server" not in answer.headers:
        err = answer.error()  # asserts the content type, the keys and the request id
        assert err["message"] and err["type"].isidentifier(), err


def serves(gw: Gateway) -> None:
    assert httpx.get(f"{gw.url}/echo/ok", timeout=5).status_code == 200


# Bytes a request target may hold on the wire, plus the ones it may not (space, CR, LF, NUL,
# DEL, 8-bit): the parser must refuse the latter cleanly.
target_bytes = st.binary(min_size=0, max_size=300)
header_name = st.text(
    st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
    min_size=1,
    max_size=40,
)
header_value = st.binary(max_size=200).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@FUZZ
@given(
    target=target_bytes, method=st.sampled_from([b"GET", b"POST", b"DELETE", b"PURGE", b"G\xe9T"])
)
def test_fuzz_paths(gw: Gateway, target: bytes, method: bytes) -> None:
    for prefix in (b"/echo/", b"/v1/chat/completions/", b"/"):
        request = (
            method + b" " + prefix + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        judge(exchange(gw.port, request), request)


@FUZZ
@given(query=st.binary(max_size=400), text_query=st.text(max_size=100))
def test_fuzz_query_strings(gw: Gateway, query: bytes, text_query: str) -> None:
    for target in (b"/echo/q?" + query, b"/v1/chat/completions?" + query):
        request = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        judge(exchange(gw.port, request), request)
    # the same through a real client, percent-encoded: parameters reach the guardrail
    resp = httpx.get(f"{gw.url}/v1/chat/completions", params={"q": text_query, text_query: "1"})
    assert resp.status_code < 500, resp.text
    if resp.status_code == 400:
        assert resp.json()["error"]["type"] in ("prompt_rejected", "invalid_request")


@FUZZ
@given(headers=st.lists(st.tuples(header_name, header_value), max_size=20))
def test_fuzz_headers(gw: Gateway, headers: list[tuple[str, bytes]]) -> None:
    lines = b"".join(k.encode() + b": " + v + b"\r\n" for k, v in headers)
    for target in (b"/echo/h", b"/v1/chat/completions"):
        request = (
            b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + lines + b"Connection: close\r\n\r\n"
        )
        judge(exchange(gw.port, request), request)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(
        st.characters(codec=None, categories=None),
        max_size=50,  # every code point, surrogates too
    )
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)


@FUZZ
@given(
    content=json_values,
    role=st.sampled_from(["user", "system", "assistant", "tool", "", "x" * 300]),
    extra=st.dictionaries(st.text(max_size=10), json_values, max_size=3),
    stream=st.booleans(),
)
def test_fuzz_json_bodies(
    gw: Gateway, content: Any, role: str, extra: dict[str, Any], stream: bool
) -> None:
    doc = {
        **extra,
        "model": "m",
        "messages": [{"role": role, "content": content}],
        "stream": stream,
    }
    body = json.dumps(doc).encode()  # ensure_ascii: lone surrogates become \\udXXX escapes
    resp = httpx.post(f"{gw.url}/v1/chat/completions", content=body, timeout=10,
                      headers={"Content-Type": "application/json"})  # fmt: skip
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400 and "server" not in resp.headers:
        err = resp.json()["error"]
        assert err["request_id"] == resp.headers["x-request-id"], err


@FUZZ
@given(body=st.binary(max_size=2000))
def test_fuzz_raw_bodies(gw: Gateway, body: bytes) -> None:
    resp = httpx.post(f"{gw.url}/v1/chat/completions", content=body, timeout=10)
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400 and "server" not in resp.headers:
        assert resp.json()["error"]["type"] in ("invalid_request", "prompt_rejected"), resp.text


@FUZZ
@given(prompt=st.text(st.characters(codec="utf-8"), max_size=500))
def test_fuzz_unicode_prompts(gw: Gateway, prompt: str) -> None:
    doc = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
    resp = httpx.post(f"{gw.url}/v1/chat/completions", json=doc, timeout=10)
    assert resp.status_code in (200, 400), resp.text
    if resp.status_code == 400:
        assert resp.json()["error"]["type"] in ("prompt_rejected", "invalid_request")
    else:
        assert resp.json()["choices"][0]["message"]["content"] is not None


def test_serves_after_fuzzing(gw: Gateway) -> None:
    serves(gw)
    assert gw.metric("gateway_request_errors_total", {"type": "internal_error"}) == 0
