"""Hostile input through the real server over TCP: request smuggling, header bombs, invalid
UTF-8, deep or huge JSON, slowloris, slow bodies and connection floods.

Each gets its documented 4xx (in the JSON error shape) or a closed connection, never a 5xx
the policy did not choose; the admin health probe answers within 100 ms during the attacks,
and the gateway serves normally right after. Results: docs/hardening.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.hardening.helpers import (
    PROBE_BOUND,
    Load,
    Probe,
    assert_only,
    parse_answer,
    probes,
    raw_request,
    wait_until,
)
from tests.procs import ROOT, Gateway, MockLLM

POLICY = """
version: 1
upstream: {url: "{upstream}", timeout: 5s}
max_body_bytes: 64KiB
max_header_bytes: 8KiB
max_header_count: 50
max_connections: 400
header_read_timeout: 2s
body_read_timeout: 2s
telemetry: {access_log: false}
routes:
  - name: chat
    path: /v1/chat
    guardrails:
      input: {format: openai, max_depth: 32, rules: [prompt-injection]}
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, mock_llm: MockLLM) -> Iterator[Gateway]:
    """One gateway for the module (the attacks leave nothing behind; each test checks)."""
    folder = tmp_path_factory.mktemp("hostile")
    path = folder / "policy.yaml"
    path.write_text(POLICY.replace("{upstream}", mock_llm.url))
    gateway = Gateway(path, folder / "gateway.log")
    yield gateway
    gateway.stop()
    log = gateway.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-5000:]


def serves(gw: Gateway) -> None:
    """The gateway still answers a normal request normally."""
    resp = httpx.get(f"{gw.url}/echo/after", timeout=5)
    assert resp.status_code == 200, resp.text


def refused(data: bytes, status: int, type_: str) -> dict[str, Any]:
    """Parse a single refusal: status, JSON shape, connection closed after it."""
    answer = parse_answer(data)
    assert answer.status == status, data[:400]
    assert answer.headers.get("connection") == "close", answer.headers
    err = answer.error()
    assert err["type"] == type_, err
    assert data.count(b"HTTP/1.1 ") == 1, f"more than one answer (smuggled?): {data!r}"
    return err


SMUGGLING = {
    "cl_te": b"POST /echo/a HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /echo/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "te_cl": b"POST /echo/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 3\r\n\r\n0\r\n\r\nGET /echo/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "duplicate_cl": b"POST /echo/a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
    b"Content-Length: 40\r\n\r\nGET /echo/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "duplicate_cl_equal": b"POST /echo/a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
    b"Content-Length: 2\r\n\r\nab",
    "obs_fold": b"GET /echo/a HTTP/1.1\r\nHost: x\r\nX-A: a\r\n Transfer-Encoding: chunked\r\n\r\n",
    "te_chunked_not_last": b"POST /echo/a HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "space_before_colon": b"POST /echo/a HTTP/1.1\r\nHost: x\r\nContent-Length : 3\r\n\r\nabc",
    "cl_signed": b"POST /echo/a HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
    "cl_hex": b"POST /echo/a HTTP/1.1\r\nHost: x\r\nContent-Length: 0x3\r\n\r\nabc",
    "chunk_size_overflow": b"POST /echo/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"fffffffffffffffff1\r\nabc\r\n0\r\n\r\n",
    "bare_lf": b"GET /echo/a HTTP/1.1\nHost: x\n\n",
    "nul_in_header": b"GET /echo/a HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "space_in_name": b"GET /echo/a HTTP/1.1\r\nHost: x\r\nX A: 1\r\n\r\n",
    "tls_hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
    "bad_version": b"GET /echo/a HTTP/9.9\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_smuggling_and_malformed_requests_are_400_json_and_closed(gw: Gateway, name: str) -> None:
    before = gw.metric("gateway_request_errors_total", {"type": "invalid_request"})
    data = raw_request(gw.port, SMUGGLING[name])
    refused(data, 400, "invalid_request")
    assert b"smuggled" not in data
    after = gw.metric("gateway_request_errors_total", {"type": "invalid_request"})
    assert after == before + 1
    serves(gw)


def test_lenient_but_valid_framing_is_forwarded_with_one_length(gw: Gateway) -> None:
    # "gzip, chunked" is valid (chunked last): the body is de-chunked and forwarded once.
    data = raw_request(
        gw.port,
        b"POST /echo/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n"
        b"Connection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    answer = parse_answer(data)
    assert answer.status == 200
    echo = json.loads(answer.body)
    assert echo["body_len"] == 3
    assert "transfer-encoding" not in echo["headers"] or echo["headers"].get(
        "transfer-encoding"
    ) == ("chunked")


def test_header_bombs(gw: Gateway) -> None:
    # just over max_header_bytes: the app's 431 (the connection may stay open)
    one_big = b"GET /echo/a HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: "
    answer = parse_answer(raw_request(gw.port, one_big + b"a" * 9000 + b"\r\n\r\n"))
    assert answer.status == 431 and answer.error()["type"] == "headers_too_large"
    # far over it (max_header_bytes + 9 KiB of raw head): cut off while it arrives
    refused(raw_request(gw.port, one_big + b"a" * 30000 + b"\r\n\r\n"), 431, "headers_too_large")
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(60))
    err = refused(raw_request(gw.port, b"GET /echo/a HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n"),
                  431, "headers_too_large")  # fmt: skip
    assert "50" in err["message"]
    long_url = b"GET /echo/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    refused(raw_request(gw.port, long_url), 414, "uri_too_long")
    serves(gw)


def test_endless_head_is_cut_off_without_buffering_it(gw: Gateway) -> None:
    # 4 MiB of one header value with no line end: refused once the bound is passed,
    # the rest is never read (the send fails or is discarded), memory does not grow.
    rss = _rss_kib(gw)
    data = raw_request(
        gw.port, b"GET /echo/a HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * (4 * 1024 * 1024)
    )
    refused(data, 431, "headers_too_large")
    assert _rss_kib(gw) - rss < 8 * 1024
    serves(gw)


def _rss_kib(gw: Gateway) -> int:
    for line in Path(f"/proc/{gw.popen.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_invalid_utf8(gw: Gateway) -> None:
    refused(raw_request(gw.port, b"GET /echo/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n"),
            400, "invalid_request")  # fmt: skip
    # In a header value it is opaque bytes (RFC 9110 obs-text): forwarded, not a crash.
    data = raw_request(
        gw.port,
        b"GET /echo/a HTTP/1.1\r\nHost: x\r\nX-A: \xff\xfe\r\nX-Request-ID: \xc3\x28\r\n"
        b"Connection: close\r\n\r\n",
    )
    answer = parse_answer(data)
    assert answer.status == 200
    assert len(answer.headers["x-request-id"]) == 32  # the invalid id was replaced
    # In a JSON body read by a guardrail: 400 invalid_request.
    body = b'{"model":"m","messages":[{"role":"user","content":"\xff\xfe"}]}'
    resp = httpx.post(f"{gw.url}/v1/chat/completions", content=body,
                      headers={"Content-Type": "application/json"})  # fmt: skip
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request"
    # A lone surrogate escaped in JSON is valid JSON but not text (it was a 500 before).
    body = b'{"model":"m","messages":[{"role":"user","content":"ign\\ud800ore hi"}]}'
    resp = httpx.post(f"{gw.url}/v1/chat/completions", content=body,
                      headers={"Content-Type": "application/json"})  # fmt: skip
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request"
    serves(gw)


def test_deep_and_huge_json(gw: Gateway) -> None:
    chat = f"{gw.url}/v1/chat/completions"
    deep = '{"model":"m","messages":[{"role":"user","content":"hi"}],"x":' + "[" * 20000
    deep += "]" * 20000 + "}"
    resp = httpx.post(chat, content=deep.encode(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request", resp.text
    deep_obj = '{"a":' * 5000 + "1" + "}" * 5000
    resp = httpx.post(chat, content=deep_obj.encode())
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request"
    huge = {"model": "m", "messages": [{"role": "user", "content": "x" * 70_000}]}
    resp = httpx.post(chat, json=huge)
    assert resp.status_code == 413 and resp.json()["error"]["type"] == "body_too_large"
    many = {"model": "m", "messages": [{"role": "user", "content": "é"} for _ in range(1000)]}
    resp = httpx.post(chat, json=many, timeout=30)
    assert resp.status_code == 200, resp.text
    big_number = (
        b'{"model":"m","messages":[{"role":"user","content":"hi"}],"n":1' + b"0" * 5000 + b"}"
    )
    resp = httpx.post(chat, content=big_number)
    assert resp.status_code in (200, 400), resp.text
    serves(gw)


def _attack(gw: Gateway, kind: str, conns: int, duration: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.hardening.attacker", kind, "--port", str(gw.port),
         "--conns", str(conns), "--duration", str(duration)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def _under_attack(
    gw: Gateway, kind: str, conns: int, duration: float
) -> tuple[dict[str, int], list[Probe], Load]:
    """Run the attack while normal clients and health probes go on; returns the attacker's
    counts, the probe latencies and the normal load."""
    attacker = _attack(gw, kind, conns, duration)
    try:
        time.sleep(1.0)  # let the attack build up
        load = Load(lambda c: c.get(f"{gw.url}/echo/normal"), threads=2, pause=0.02)
        latencies = probes(gw.admin, gw.popen.pid, count=int((duration - 2) / 0.1), gap=0.05)
        load.stop()
        out, _ = attacker.communicate(timeout=duration + 60)
    finally:
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait()
    assert attacker.returncode == 0
    stats = json.loads(out.strip().splitlines()[-1])
    # for the results table (pytest -s): what the attack did and how health probes fared
    worst = max(latencies, key=lambda p: p.net)
    print(f"\n{kind}: attacker {stats}; {len(latencies)} probes, max "
          f"{max(p.seconds for p in latencies) * 1000:.1f} ms raw, "
          f"{worst.net * 1000:.1f} ms net of CPU starvation (that probe: "
          f"{worst.seconds * 1000:.1f} ms, {worst.starved * 1000:.1f} ms waiting for a CPU); "
          f"normal load {dict(load.summary())}")  # fmt: skip
    return stats, latencies, load


def test_slowloris_headers_alongside_normal_clients(gw: Gateway) -> None:
    stats, latencies, load = _under_attack(gw, "slowloris", conns=150, duration=7.0)
    # every slow head was cut at header_read_timeout (2 s) with a 408
    assert stats.get("answer_HTTP/1.1 408", 0) >= 150, stats
    assert max(p.net for p in latencies) < PROBE_BOUND, sorted(latencies, key=lambda p: p.net)[-5:]
    assert len(load.samples) > 20
    assert_only(load.samples, {(200, "")}, "normal clients during slowloris")
    assert gw.metric("gateway_request_errors_total", {"type": "request_timeout"}) >= 150
    serves(gw)


def test_slow_body_alongside_normal_clients(gw: Gateway) -> None:
    stats, latencies, load = _under_attack(gw, "slowbody", conns=150, duration=7.0)
    assert stats.get("answer_HTTP/1.1 408", 0) >= 150, stats
    assert max(p.net for p in latencies) < PROBE_BOUND, sorted(latencies, key=lambda p: p.net)[-5:]
    assert_only(load.samples, {(200, "")}, "normal clients during slow bodies")
    serves(gw)


def test_connection_flood_is_capped(gw: Gateway) -> None:
    # 700 idle connections against max_connections: 400: the ones over the cap are dropped
    # at once, the others at header_read_timeout; normal clients get 200 or, while every slot
    # is taken, the policy's 503 overloaded.
    stats, latencies, load = _under_attack(gw, "flood", conns=700, duration=7.0)
    assert stats.get("closed_by_server", 0) > 700, stats
    assert max(p.net for p in latencies) < PROBE_BOUND, sorted(latencies, key=lambda p: p.net)[-5:]
    assert_only(load.samples, {(200, ""), (503, "overloaded")}, "normal clients during a flood")
    assert gw.metric("gateway_request_errors_total", {"type": "overloaded"}) > 0
    wait_until(lambda: httpx.get(f"{gw.url}/echo/x").status_code == 200, 5, "serving again")
    started = time.monotonic()
    serves(gw)
    assert time.monotonic() - started < 1.0
