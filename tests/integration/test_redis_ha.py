"""Redis Cluster (3 masters) and Sentinel (primary, replica, sentinel) started locally."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

from gateway.store.base import Counter
from gateway.store.redis import RedisStore
from tests.integration.test_redis import same_as_memory
from tests.procs import Gateway, MockLLM
from tests.redis_procs import RedisClusterSet, SentinelSet, redis_cluster, redis_sentinel

__all__ = ["redis_cluster", "redis_sentinel"]  # the module-scoped fixtures

StartGateway = Callable[..., Gateway]


def test_cluster_script_gives_the_memory_store_answers(redis_cluster: RedisClusterSet) -> None:
    # batches span up to three hash slots: parallel calls, and take-backs on refusals
    asyncio.run(same_as_memory(redis_cluster.url, "cl", steps=250))


def test_cluster_refusal_in_one_slot_takes_back_the_others(
    redis_cluster: RedisClusterSet,
) -> None:
    async def run() -> list[int]:
        rs = RedisStore(redis_cluster.url, 1.0)
        assert rs.cluster
        ip, route = Counter("x:{ip:a}:r60", 10, 60_000), Counter("x:{r:chat}:r60", 1, 60_000)
        assert (await rs.hit([ip, route])).allowed
        refused = await rs.hit([ip, route])
        assert not refused.allowed and refused.failed == 1 and refused.remaining == [9, 0]
        after = await rs.hit([Counter("x:{ip:a}:r60", 10, 60_000, 0)])
        await rs.close()
        return after.remaining

    assert asyncio.run(run()) == [9]  # the refused request was taken back from the ip slot


def test_gateway_on_a_cluster(
    start_gateway: StartGateway, mock_llm: MockLLM, redis_cluster: RedisClusterSet
) -> None:
    gw = start_gateway(
        'version: 1\nupstream: {url: "{upstream}"}\n'
        f'state: {{url: "{redis_cluster.url}", key_prefix: clgw, on_error: deny}}\n'
        "rate_limits: {per_ip: 5/day, per_route: 7/day}\n",
        mock_llm.url,
    )
    assert httpx.get(f"{gw.admin}/readyz").status_code == 200
    with httpx.Client(base_url=gw.url) as client:
        codes = [client.get("/echo/x").status_code for _ in range(6)]
        assert codes == [200] * 5 + [429]
        other = client.get("/echo/x", headers={"X-Forwarded-For": "192.0.2.9"})
    assert other.status_code == 429  # same peer: XFF from an untrusted peer is ignored


def test_sentinel_failover_keeps_limits_working(
    start_gateway: StartGateway, mock_llm: MockLLM, redis_sentinel: SentinelSet
) -> None:
    gw = start_gateway(
        'version: 1\nupstream: {url: "{upstream}"}\n'
        f'state: {{url: "{redis_sentinel.url}", key_prefix: sen, on_error: deny,\n'
        "        timeout: 200ms, breaker_failures: 5, breaker_probe: 100ms}\n"
        "rate_limits: {per_ip: 8/day}\n",
        mock_llm.url,
    )
    with httpx.Client(base_url=gw.url) as client:
        before = [client.get("/echo/x").status_code for _ in range(3)]
        assert before == [200] * 3
        old = redis_sentinel.primary.port
        assert redis_sentinel.failover() != old
        after: list[int] = []
        deadline = time.monotonic() + 15
        while after.count(429) < 2 and time.monotonic() < deadline:
            after.append(client.get("/echo/x").status_code)
            if after[-1] == 503:  # the old primary refuses writes: reconnecting
                time.sleep(0.1)
    assert set(after) <= {200, 429, 503}
    assert after.count(503) <= 5
    # the count survived the failover: exactly 8 admitted in all
    assert before.count(200) + after.count(200) == 8
    assert after[-2:] == [429, 429]
