"""Redis killed, hung and restarted under load: each state.on_error mode does what it says."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.procs import Gateway, MockLLM, wait_for
from tests.redis_procs import RedisServer

StartGateway = Callable[..., Gateway]
MODES = ("allow", "deny", "local")


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone (it gets killed)."""
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def policy(url: str, mode: str, limit: str = "6/day") -> str:
    return (
        'version: 1\nupstream: {url: "{upstream}"}\n'
        f'state: {{url: "{url}", on_error: {mode}, replicas: 2, timeout: 50ms,\n'
        f"        breaker_failures: 2, breaker_probe: 100ms, key_prefix: {mode}}}\n"
        f"rate_limits: {{per_ip: {limit}}}\n"
    )


class Load:
    """Requests to every gateway from a background thread; statuses counted per mode."""

    def __init__(self, gws: dict[str, Gateway]) -> None:
        self.gws = gws
        self.seen: dict[str, Counter[int]] = {m: Counter() for m in gws}
        self.bodies: dict[str, set[str]] = {m: set() for m in gws}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                for mode, gw in self.gws.items():
                    resp = client.get(f"{gw.url}/echo/load", headers={"X-Load": "1"})
                    self.seen[mode][resp.status_code] += 1
                    if resp.status_code >= 400:
                        self.bodies[mode].add(resp.json()["error"]["type"])
                time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def test_redis_killed_and_restarted_under_load(
    start_gateway: StartGateway, mock_llm: MockLLM, redis: RedisServer
) -> None:
    gws = {m: start_gateway(policy(redis.url, m), mock_llm.url, name=f"{m}.yaml") for m in MODES}
    load = Load(gws)
    for gw in gws.values():  # every limit is used up through Redis first
        assert wait_for(
            lambda gw=gw: gw.metric("gateway_ratelimit_rejections_total", {"scope": "ip"}) > 0,
            timeout=10.0,
        )
    redis.kill()
    for gw in gws.values():
        assert wait_for(lambda gw=gw: gw.metric("gateway_state_degraded") == 1, timeout=10.0)
    errors = {m: gw.metric("gateway_state_errors_total", {"op": "hit"}) for m, gw in gws.items()}
    time.sleep(1.0)  # the outage goes on, the load too
    for mode, gw in gws.items():
        # the breaker is open: no request waits on Redis any more (no new failed calls)
        assert gw.metric("gateway_state_errors_total", {"op": "hit"}) == errors[mode] <= 2
        assert gw.metric("gateway_state_fallback_total", {"mode": mode}) > 10
    ready = {m: httpx.get(f"{gw.admin}/readyz").status_code for m, gw in gws.items()}
    assert ready == {"allow": 200, "deny": 503, "local": 200}
    load.stop()
    # the local limiter allows limit // replicas = 3 per process during the outage
    fresh = httpx.get(f"{gws['local'].url}/echo/x", headers={"X-Forwarded-For": "x"})
    assert fresh.status_code == 429 and fresh.json()["error"]["scope"] == "ip"

    redis.start()  # empty again: no persistence
    for gw in gws.values():
        assert wait_for(lambda gw=gw: gw.metric("gateway_state_degraded") == 0, timeout=10.0)
    for mode, gw in gws.items():
        codes = [httpx.get(f"{gw.url}/echo/after").status_code for _ in range(8)]
        assert codes == [200] * 6 + [429] * 2, mode  # shared limits enforced again
    seen = load.seen
    assert set(seen["allow"]) <= {200, 429} and seen["allow"][200] > 6  # unlimited while down
    assert set(seen["local"]) <= {200, 429} and seen["local"][200] <= 6 + 3
    assert set(seen["deny"]) <= {200, 429, 503} and seen["deny"][503] > 10
    assert load.bodies["deny"] == {"rate_limited", "state_unavailable"}


def test_hung_redis_times_out_then_the_breaker_opens(
    start_gateway: StartGateway, mock_llm: MockLLM, redis: RedisServer
) -> None:
    gw = start_gateway(policy(redis.url, "allow", "100/day"), mock_llm.url)
    with httpx.Client(base_url=gw.url, timeout=5) as client:
        assert client.get("/echo/x").status_code == 200
        redis.pause()  # the port stays open, nothing answers
        try:
            codes = [client.get("/echo/x").status_code for _ in range(10)]
            assert codes == [200] * 10  # allow: the 50 ms timeout, then unlimited
            assert gw.metric("gateway_state_errors_total", {"op": "hit"}) == 2
            assert gw.metric("gateway_state_degraded") == 1
        finally:
            redis.resume()
        assert wait_for(lambda: gw.metric("gateway_state_degraded") == 0, timeout=10.0)
        resp = client.get("/echo/x")
        # 1 before + this one; the two timed-out calls may still have run once Redis woke up
        # (a timeout can over-count, never under-count)
        assert resp.status_code == 200 and resp.headers["ratelimit-remaining"] in ("96", "97", "98")
