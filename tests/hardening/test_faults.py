"""Faults under load, end to end with real processes: Redis slowed, killed and restarted; the
upstream crashing mid-stream, slow, answering garbage or a broken chunked body, killed and
restarted; the identity provider down and back; the policy file replaced by garbage or
deleted; SIGTERM.

For each: no 5xx but the ones the policy chose (and documents), and normal service again
within 1 s of the fault's end. Related single-request tests that these extend:
tests/integration/test_redis_failures.py (every ``state.on_error`` mode, hung Redis),
test_proxy.py (each upstream fault once), test_jwks.py (stale keys), test_lifecycle.py
(reload and drain without load).
"""

from __future__ import annotations

import json
import signal
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.authkit import claims, rs, rsa_jwk, token
from tests.hardening.delayproxy import DelayProxy
from tests.hardening.helpers import (
    Load,
    Sample,
    assert_only,
    assert_recovered,
    wait_until,
)
from tests.integration.test_jwks import make_tls
from tests.procs import GATEWAY, Gateway, MockLLM, Proc, free_port, wait_http
from tests.rawupstream import RawUpstream
from tests.redis_procs import RedisServer

StartGateway = Callable[..., Gateway]


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone (it gets killed)."""
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def raw_upstream() -> Iterator[RawUpstream]:
    up = RawUpstream().start()
    yield up
    up.stop()


def limited(resp: httpx.Response) -> str:
    """``shared`` for a 200 counted in the shared store (RateLimit headers), ``unlimited`` for
    a 200 let through by ``on_error: allow``, the error type otherwise."""
    if resp.status_code == 200:
        return "shared" if "ratelimit-remaining" in resp.headers else "unlimited"
    return str(resp.json()["error"]["type"])


def redis_policy(url: str, mode: str) -> str:
    return (
        'version: 1\nupstream: {url: "{upstream}"}\n'
        f'state: {{url: "{url}", on_error: {mode}, timeout: 200ms,\n'
        "        breaker_failures: 2, breaker_probe: 100ms}\n"
        "rate_limits: {per_ip: 1000000/hour}\ntelemetry: {access_log: false}\n"
    )


def during(samples: list[Sample], start: float, end: float) -> list[Sample]:
    return [s for s in samples if start <= s.start < end]


@pytest.mark.parametrize("mode", ["allow", "deny"])
def test_redis_slowed_by_a_tcp_delay_proxy_under_load(
    start_gateway: StartGateway, mock_llm: MockLLM, redis: RedisServer, mode: str
) -> None:
    proxy = DelayProxy(redis.port).start()
    try:
        gw = start_gateway(redis_policy(f"redis://127.0.0.1:{proxy.port}", mode), mock_llm.url)
        load = Load(lambda c: c.get(f"{gw.url}/echo/x"), classify=limited)
        load.wait(20)
        slowed = time.monotonic()
        proxy.delay = 0.6  # every Redis reply now takes longer than state.timeout (200 ms)
        wait_until(lambda: gw.metric("gateway_state_degraded") == 1, 5, "breaker open")
        load.wait(50)
        assert gw.metric("gateway_state_errors_total", {"op": "hit"}) >= 2
        assert gw.metric("gateway_state_fallback_total", {"mode": mode}) > 0
        proxy.delay = 0.0
        healed = time.monotonic()
        time.sleep(2.0)
        samples = load.stop()
    finally:
        proxy.stop()
    fallback = {"allow": (200, "unlimited"), "deny": (503, "state_unavailable")}[mode]
    assert_only(samples, {(200, "shared"), fallback}, f"on_error: {mode} with a slow Redis")
    # nobody waits on the slow store: at most state.timeout per request, breaker or not
    slow = [s.end - s.start for s in during(samples, slowed, healed)]
    assert max(slow) < 0.6, sorted(slow)[-5:]
    took = assert_recovered(samples, healed, {(200, "shared")})
    print(f"\nslow redis ({mode}): {dict(load.summary())}; recovered after {took:.2f}s")


def test_redis_killed_and_restarted_under_load_recovers_within_a_second(
    start_gateway: StartGateway, mock_llm: MockLLM, redis: RedisServer
) -> None:
    # on_error: deny (the strictest mode); allow and local: test_redis_failures.py
    gw = start_gateway(redis_policy(redis.url, "deny"), mock_llm.url)
    load = Load(lambda c: c.get(f"{gw.url}/echo/x"), classify=limited)
    load.wait(20)
    redis.kill()
    wait_until(lambda: gw.metric("gateway_state_degraded") == 1, 5, "breaker open")
    load.wait(30)
    assert httpx.get(f"{gw.admin}/readyz").status_code == 503
    redis.start()
    back = time.monotonic()
    time.sleep(2.0)
    samples = load.stop()
    assert_only(samples, {(200, "shared"), (503, "state_unavailable")}, "Redis killed")
    assert load.summary()[(503, "state_unavailable")] > 10
    took = assert_recovered(samples, back, {(200, "shared")})
    assert httpx.get(f"{gw.admin}/readyz").status_code == 200
    print(f"\nredis killed: {dict(load.summary())}; recovered after {took:.2f}s")


def test_upstream_crashing_mid_stream_under_load(
    start_gateway: StartGateway, raw_upstream: RawUpstream
) -> None:
    gw = start_gateway('version: 1\nupstream: {url: "{upstream}", timeout: 2s}\n',
                       raw_upstream.url)  # fmt: skip
    load = Load(lambda c: c.get(f"{gw.url}/ok"))
    streams: list[bytes | str] = []

    def stream() -> None:
        try:
            with httpx.stream("GET", f"{gw.url}/reset", timeout=5) as resp:
                streams.append(b"".join(resp.iter_raw()))
        except httpx.HTTPError as exc:
            streams.append(type(exc).__name__)

    threads = [threading.Thread(target=stream) for _ in range(20)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert time.monotonic() - started < 5, "a stream hung after the upstream crashed"
    ended = time.monotonic()
    time.sleep(1.5)
    samples = load.stop()
    # every client stream ends cleanly with what the upstream sent before it crashed
    assert streams == [b"data: first\n\ndata: second\n\n"] * 20, streams
    assert_only(samples, {(200, "")}, "other clients while streams crash")
    assert_recovered(samples, ended, {(200, "")})
    assert gw.metric("gateway_upstream_errors_total", {"kind": "reset"}) == 20


def test_upstream_slow_is_504_within_the_timeout(
    start_gateway: StartGateway, raw_upstream: RawUpstream
) -> None:
    gw = start_gateway('version: 1\nupstream: {url: "{upstream}", timeout: 1s}\n',
                       raw_upstream.url)  # fmt: skip
    load = Load(lambda c: c.get(f"{gw.url}/ok"))
    slow = Load(lambda c: c.get(f"{gw.url}/slow"), threads=8, pause=0)
    time.sleep(3.0)
    slow_samples = slow.stop()
    ended = time.monotonic()
    time.sleep(1.5)
    samples = load.stop()
    assert_only(slow_samples, {(504, "upstream_timeout")}, "slow upstream")
    took = [s.end - s.start for s in slow_samples]
    assert min(took) >= 0.95 and max(took) < 1.5, (min(took), max(took))
    assert_only(samples, {(200, "")}, "fast requests beside slow ones")
    assert max(s.end - s.start for s in samples) < 0.5  # not queued behind the slow ones
    assert_recovered(samples, ended, {(200, "")})


def test_upstream_garbage_under_load(
    start_gateway: StartGateway, raw_upstream: RawUpstream
) -> None:
    gw = start_gateway('version: 1\nupstream: {url: "{upstream}", timeout: 2s}\n',
                       raw_upstream.url)  # fmt: skip
    load = Load(lambda c: c.get(f"{gw.url}/ok"))
    garbage = Load(lambda c: c.get(f"{gw.url}/garbage"), threads=2, pause=0)
    time.sleep(2.0)
    g = garbage.stop()
    ended = time.monotonic()
    time.sleep(1.5)
    samples = load.stop()
    assert_only(g, {(502, "upstream_protocol_error")}, "garbage answers")
    assert len(g) > 10
    assert_only(samples, {(200, "")}, "normal requests beside broken ones")
    assert_recovered(samples, ended, {(200, "")})
    assert "Traceback" not in gw.log()


def test_upstream_broken_chunked_body_ends_the_stream(
    start_gateway: StartGateway, raw_upstream: RawUpstream
) -> None:
    gw = start_gateway('version: 1\nupstream: {url: "{upstream}", timeout: 1s}\n',
                       raw_upstream.url)  # fmt: skip
    started = time.monotonic()
    try:
        resp = httpx.get(f"{gw.url}/badchunk", timeout=5)
    except httpx.ReadTimeout:
        pytest.fail(f"hung for {time.monotonic() - started:.1f}s on a broken chunked body")
    # the head was sent already: the stream ends cleanly after the good chunk (documented)
    assert resp.status_code == 200 and resp.content == b"hello"
    assert gw.metric("gateway_upstream_errors_total", {"kind": "protocol"}) == 1


def test_upstream_killed_and_restarted_under_load(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def mock() -> Proc:
        args = [*GATEWAY, "mock-llm", "--listen", f"127.0.0.1:{port}"]
        proc = Proc(args, tmp_path / f"mock-{time.monotonic()}.log")
        wait_http(f"{url}/health", proc=proc.popen)
        return proc

    upstream = mock()
    try:
        gw = start_gateway('version: 1\nupstream: {url: "{upstream}", timeout: 5s}\n', url)
        load = Load(lambda c: c.get(f"{gw.url}/echo/x"))
        load.wait(20)
        upstream.popen.kill()
        upstream.popen.wait()
        load.wait(20)
        upstream = mock()
        back = time.monotonic()
        time.sleep(2.0)
        samples = load.stop()
    finally:
        upstream.stop()
    allowed = {(200, ""), (502, "upstream_unavailable"), (502, "upstream_reset")}
    assert_only(samples, allowed, "upstream killed")
    assert load.summary()[(502, "upstream_unavailable")] > 5
    took = assert_recovered(samples, back, {(200, "")})
    print(f"\nupstream killed: {dict(load.summary())}; recovered after {took:.2f}s")


class _Provider:
    """An HTTPS JWKS endpoint that can stop and start again on the same port."""

    def __init__(self, ctx: ssl.SSLContext, keys: list[dict[str, Any]]) -> None:
        self.ctx = ctx
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}/jwks.json"
        body = json.dumps({"keys": keys}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.handler = Handler
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self.handler)
        self.server.socket = self.ctx.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def test_identity_provider_down_and_back(
    start_gateway: StartGateway, mock_llm: MockLLM, tmp_path: Path
) -> None:
    key = rsa.generate_private_key(65537, 2048)
    ca, ctx = make_tls(tmp_path)
    idp = _Provider(ctx, [rsa_jwk(key, "k1")])
    idp.start()
    try:
        gw = start_gateway(
            'version: 1\nupstream: {url: "{upstream}"}\n'
            f'auth: {{algorithms: [RS256], jwks_url: "{idp.url}", jwks_ca: "{ca}",\n'
            "       jwks_refresh: 500ms, jwks_cooldown: 200ms, jwks_max_stale: 2s}\n",
            mock_llm.url,
        )
        tok = token({"alg": "RS256", "kid": "k1"}, claims(aud=None, iss=None), rs(key))
        auth = {"Authorization": f"Bearer {tok}"}
        load = Load(lambda c: c.get(f"{gw.url}/echo/x", headers=auth))
        load.wait(20)
        idp.stop()
        down = time.monotonic()
        wait_until(lambda: load.samples[-1].status == 503, 10, "keys stale")
        stale_at = time.monotonic() - down
        load.wait(20)
        idp.start()
        back = time.monotonic()
        time.sleep(2.5)
        samples = load.stop()
    finally:
        idp.stop()
    # the last good keys serve until jwks_max_stale (2 s after the last good fetch, which
    # was at most jwks_refresh = 0.5 s before the provider went down), then the policy's 503
    assert 1.4 <= stale_at < 4.0, stale_at
    assert_only(samples, {(200, ""), (503, "auth_unavailable")}, "identity provider down")
    took = assert_recovered(samples, back, {(200, "")})
    print(f"\nidp down: {dict(load.summary())}; stale after {stale_at:.2f}s, "
          f"recovered after {took:.2f}s")  # fmt: skip


def reload_failures(gw: Gateway) -> int:
    return int(gw.metric("gateway_config_reload_total", {"result": "failure"}))


def test_policy_replaced_by_garbage_or_deleted_under_load(
    start_gateway: StartGateway, mock_llm: MockLLM
) -> None:
    good = f'version: 1\nupstream: {{url: "{mock_llm.url}"}}\nmax_body_bytes: 1KiB\n'
    gw = start_gateway(good)
    load = Load(lambda c: c.post(f"{gw.url}/echo/x", content=b"a" * 600))
    load.wait(20)
    failures = 0
    for broken in ["version: 1\nupstream: {url: nope\n  garbage: [", "", "\x00\xff" * 100]:
        gw.policy.write_bytes(broken.encode("latin-1"))
        failures += 1
        wait_until(lambda n=failures: reload_failures(gw) >= n, 5, "reload failed")
        failures = reload_failures(gw)
        load.wait(10)
    gw.policy.unlink()
    wait_until(lambda: reload_failures(gw) > failures, 5, "deletion seen")
    load.wait(10)
    gw.policy.write_text(good.replace("1KiB", "100"))  # a valid new policy: 600 B is too large
    fixed = time.monotonic()
    wait_until(lambda: load.samples[-1].status == 413, 5, "new policy in use")
    took = time.monotonic() - fixed
    samples = load.stop()
    before = [s for s in samples if s.start < fixed]
    assert_only(before, {(200, "")}, "old policy keeps serving")
    assert_only(samples, {(200, ""), (413, "body_too_large")}, "whole run")
    assert took < 2.0  # polled every second
    assert gw.metric("gateway_config_reload_total", {"result": "success"}) == 1
    assert "Traceback" not in gw.log()


def test_sigterm_under_load_finishes_in_flight_and_refuses_new(
    start_gateway: StartGateway, mock_llm: MockLLM
) -> None:
    gw = start_gateway('version: 1\nupstream: {url: "{upstream}"}\ndrain_timeout: 10s\n',
                       mock_llm.url)  # fmt: skip
    body = {"model": "m", "messages": [{"role": "user", "content": "a b c d e f"}]}
    results: list[int | str] = []

    def slow() -> None:
        try:
            r = httpx.post(f"{gw.url}/v1/chat/completions", json=body,
                           headers={"X-Mock-Latency": "0.25"}, timeout=20)  # fmt: skip
            results.append(r.status_code)
        except httpx.HTTPError as exc:
            results.append(type(exc).__name__)

    load = Load(lambda c: c.get(f"{gw.url}/echo/x"), threads=3)
    slows = [threading.Thread(target=slow) for _ in range(6)]
    for t in slows:
        t.start()
    wait_until(lambda: gw.metric("gateway_requests_in_flight") >= 6, 5, "6 slow in flight")
    gw.signal(signal.SIGTERM)
    term = time.monotonic()
    time.sleep(0.5)
    with pytest.raises(httpx.ConnectError):  # the listener is closed: refused at once
        httpx.get(f"{gw.url}/echo/x", timeout=2)
    for t in slows:
        t.join(20)
    samples = load.stop()
    assert gw.popen.wait(15) == 0
    exited = time.monotonic() - term
    assert results == [200] * 6, results  # every in-flight request finished
    after = [s for s in samples if s.start > term + 0.2]
    # new requests are refused at the TCP level (or find their kept-alive connection closed
    # before anything was sent): never an HTTP error, never a hang
    assert_only(after, {(0, "ConnectError"), (0, "RemoteProtocolError")}, "after SIGTERM")
    # A request sent on a kept-alive connection at the very moment the server closes it
    # (uvicorn closes idle connections on shutdown) finds the connection reset: the keep-alive
    # race of RFC 9112 §9.6, which clients retry. It was never processed; it may happen only
    # around the signal, and rarely.
    racing = [s for s in samples if s.error == "ReadError"]
    assert all(term - 0.5 < s.start <= term + 0.2 for s in racing), racing
    assert len(racing) <= 3, racing
    assert_only(
        [s for s in samples if s.error != "ReadError"],
        {(200, ""), (0, "ConnectError"), (0, "RemoteProtocolError")},
        "all",
    )
    assert "Traceback" not in gw.log()
    print(f"\nsigterm: load {dict(load.summary())}; exited {exited:.2f}s after SIGTERM")
