"""``state.local_share``: requests admitted in-process on room leased from a real Redis."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.integration.test_redis import _evalsha_calls, _settled, _wait_past_midnight
from tests.procs import Gateway, MockLLM
from tests.redis_procs import RedisServer, redis_server

__all__ = ["redis_server"]  # the module-scoped fixture

StartGateway = Callable[..., Gateway]
LOCAL = "gateway_state_local_admissions_total"


def policy(url: str, prefix: str, share: float, limit: int, extra: str = "") -> str:
    return (
        'version: 1\nupstream: {url: "{upstream}"}\n'
        f'state: {{url: "{url}", key_prefix: {prefix}, timeout: 500ms, local_share: {share}'
        f"{extra}}}\n"
        f"rate_limits: {{per_route: {limit}/day}}\n"
    )


def test_one_gateway_stays_exact_with_a_fraction_of_the_calls(
    start_gateway: StartGateway, mock_llm: MockLLM, redis_server: RedisServer
) -> None:
    gw = start_gateway(policy(redis_server.url, "share1", 0.5, 100), mock_llm.url)
    _wait_past_midnight()
    before = _evalsha_calls(redis_server)
    with httpx.Client(base_url=gw.url) as client:
        codes = [client.get("/echo/x").status_code for _ in range(150)]
    # Exact although most were admitted in-process: unwritten additions are written before
    # the store decides, so the 101st is refused by Redis itself.
    assert codes == [200] * 100 + [429] * 50
    assert _settled(redis_server, "share1:{r:other}:r86400000", 100) == "100"
    assert gw.metric(LOCAL) >= 60
    calls = _evalsha_calls(redis_server) - before
    assert calls < 60, calls  # 150 without local_share (100 admitted, first refusal, settles)


def test_two_gateways_exceed_a_limit_by_no_more_than_unwritten_admissions(
    start_gateway: StartGateway, mock_llm: MockLLM, redis_server: RedisServer
) -> None:
    text = policy(redis_server.url, "share2", 0.25, 200)
    gws = [start_gateway(text, mock_llm.url, name=f"p{i}.yaml") for i in range(2)]
    _wait_past_midnight()
    with httpx.Client() as client, ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: client.get(f"{gws[i % 2].url}/echo/{i}").status_code,
                              range(400)))  # fmt: skip
    admitted = codes.count(200)
    assert admitted + codes.count(429) == 400
    # Never fewer: a refusal always comes from the store, which has seen at least the limit.
    # More only by what one gateway admitted and had not written when the other asked.
    assert 200 <= admitted <= 220, admitted
    assert sum(gw.metric(LOCAL) for gw in gws) > 100
    # Every admission reaches Redis: none is lost in the background writes.
    key = "share2:{r:other}:r86400000"
    assert _settled(redis_server, key, admitted) == str(admitted)


def test_leases_end_with_their_ttl_when_redis_goes_away(
    start_gateway: StartGateway, mock_llm: MockLLM, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path)
    try:
        extra = ", on_error: deny, breaker_failures: 2, breaker_probe: 100ms, local_ttl: 200ms"
        gw = start_gateway(policy(redis.url, "share3", 0.5, 100_000, extra), mock_llm.url)
        with httpx.Client(base_url=gw.url, timeout=5) as client:
            assert [client.get("/echo/a").status_code for _ in range(20)] == [200] * 20
            assert gw.metric(LOCAL) > 0
            redis.kill()
            time.sleep(0.3)  # past local_ttl: no lease is left to admit on
            codes = [client.get("/echo/b").status_code for _ in range(10)]
            assert codes == [503] * 10  # on_error: deny applies, as without local_share
            assert gw.metric("gateway_state_errors_total", {"op": "hit"}) >= 1
    finally:
        redis.stop()
