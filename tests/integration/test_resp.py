"""The lean Redis client (``gateway.store.resp``) against a real redis-server."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from gateway.store.resp import LeanRedis, RespError
from tests.redis_procs import RedisServer, redis_server

__all__ = ["redis_server"]  # the module-scoped fixture

SCRIPT = "return {KEYS[1], ARGV[1]}"
SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()


def client(port: int, **kw: object) -> LeanRedis:
    async def here() -> tuple[str, int]:
        return "127.0.0.1", port

    return LeanRedis(here, connect_timeout=1.0, **kw)  # type: ignore[arg-type]


def test_script_loaded_on_demand_and_replies_in_order(redis_server: RedisServer) -> None:
    async def run() -> None:
        redis_server.cli("SCRIPT", "FLUSH")
        r = client(redis_server.port)
        # Many calls in one loop turn: one write, replies matched to their callers.
        replies = await asyncio.gather(*(r.evalsha(SHA, SCRIPT, [f"k{i}"], [i]) for i in range(50)))
        assert replies == [[f"k{i}".encode(), str(i).encode()] for i in range(50)]
        with pytest.raises(RespError, match="ERR"):
            await r.call(b"NOSUCHCOMMAND")
        await r.ping()
        await r.aclose()

    asyncio.run(run())


def test_timed_out_call_does_not_shift_replies(redis_server: RedisServer) -> None:
    async def run() -> None:
        r = client(redis_server.port)
        await r.ping()
        redis_server.pause()
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await r.call(b"ECHO", b"too late")
        finally:
            redis_server.resume()
        # The late reply arrives first and is dropped; the next call gets its own.
        assert await r.call(b"ECHO", b"mine") == b"mine"
        await r.aclose()

    asyncio.run(run())


def test_reconnects_after_a_restart_and_fails_waiters(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)

    async def run() -> None:
        r = client(server.port)
        await r.call(b"SET", b"a", b"1")
        server.pause()
        waiting = asyncio.ensure_future(r.call(b"GET", b"a"))
        await asyncio.sleep(0.05)
        server.kill()  # while it holds the request: the connection breaks
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(waiting, 5)
        with pytest.raises(OSError):
            await r.ping()  # refused while down
        server.start()
        await r.ping()
        await r.aclose()

    try:
        asyncio.run(run())
    finally:
        server.stop()


def test_auth_and_db_selected_on_connect(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, args=["--requirepass", "s3cret"])

    async def run() -> None:
        wrong = client(server.port, password="nope")
        with pytest.raises(RespError, match=r"WRONGPASS|invalid"):
            await wrong.ping()
        r = client(server.port, password="s3cret", db=3)
        await r.call(b"SET", b"where", b"db3")
        assert await r.call(b"CLIENT", b"INFO") is not None
        other = client(server.port, password="s3cret", db=0)
        assert await other.call(b"GET", b"where") is None
        assert await r.call(b"GET", b"where") == b"db3"
        for c in (wrong, r, other):
            await c.aclose()

    try:
        asyncio.run(run())
    finally:
        server.stop()
