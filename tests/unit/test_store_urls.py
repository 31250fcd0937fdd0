"""state.url forms: parsing into clients (no connection is made) and policy checks."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway.policy import PolicyError, load_policy_text
from gateway.store.redis import RedisStore, _hosts, lean_client
from gateway.store.resp import LeanRedis


def test_hosts() -> None:
    assert _hosts("a:1,[::1]:2,b,[::2]", 26379) == [
        ("a", 1),
        ("::1", 2),
        ("b", 26379),
        ("::2", 26379),
    ]


def test_client_kinds() -> None:
    async def run() -> None:
        plain = RedisStore("rediss://127.0.0.1:6380/2", 0.05)
        assert isinstance(plain.lean, LeanRedis) and plain.client is None and not plain.cluster
        assert plain.lean._db == 2 and plain.lean._tls is not None
        # An option only redis-py understands: redis-py takes the URL.
        other = RedisStore("redis://127.0.0.1:6380/2?health_check_interval=5", 0.05)
        assert isinstance(other.client, Redis) and other.lean is None
        kwargs = other.client.connection_pool.connection_kwargs
        assert kwargs["db"] == 2 and kwargs["socket_connect_timeout"] == 0.05
        assert "socket_timeout" not in kwargs or kwargs["socket_timeout"] is None
        cluster = RedisStore("redis+cluster://127.0.0.1:7000,127.0.0.1:7001", 0.05)
        assert isinstance(cluster.client, RedisCluster) and cluster.cluster
        sentinel = RedisStore("redis+sentinel://127.0.0.1:26379/mymaster/3", 0.05, "pw")
        assert isinstance(sentinel.lean, LeanRedis) and sentinel.lean._db == 3
        assert sentinel.lean._auth == [b"AUTH", "pw"]
        for store in (plain, other, cluster, sentinel):
            await store.close()

    asyncio.run(run())


def test_sentinel_needs_a_service_name() -> None:
    with pytest.raises(ValueError, match="service name"):
        lean_client("redis+sentinel://127.0.0.1:26379", 0.05, None)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://:secret@127.0.0.1:6379", "no password in state.url"),
        ("redis://user:secret@127.0.0.1:6379", "no password in state.url"),
        ("mongodb://127.0.0.1", "state.url"),
    ],
)
def test_policy_refuses(url: str, problem: str) -> None:
    with pytest.raises(PolicyError) as err:
        load_policy_text(
            f"version: 1\nupstream: {{url: 'http://127.0.0.1:1'}}\nstate: {{url: '{url}'}}\n"
        )
    assert problem in str(err.value)
