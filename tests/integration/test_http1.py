"""The upstream client (``gateway.http1`` behind ``gateway.upstream``) against real TCP servers.

Each test runs a scripted HTTP/1.1 server on a loopback port in the same event loop, so it can
say exactly what goes over the wire: keep-alive, pool limits, replay, framing, back-pressure.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gateway.errors import UpstreamError
from gateway.policy.sections import UpstreamConfig
from gateway.upstream import Upstream
from tests.certs import make_tls

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A loopback server running ``handler`` per connection; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The head and body of one request (Content-Length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return head, body
            body += chunk[:-2]
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return head, await reader.readexactly(int(line.split(b":")[1]))
    return head, b""


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%b\r\n%b" % (len(body), extra, body)


def upstream(port: int, scheme: str = "http", **cfg: object) -> Upstream:
    settings: dict[str, object] = {"url": f"{scheme}://127.0.0.1:{port}", "timeout": "1s"}
    settings.update(cfg)
    return Upstream(UpstreamConfig.model_validate(settings))


async def get(up: Upstream, path: str = "/", method: str = "GET", body: object = None) -> bytes:
    resp = await up.request(method, path, [(b"x-test", b"1")], body)  # type: ignore[arg-type]
    try:
        return await resp.read()
    finally:
        resp.close()


async def keep_alive_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        _, body = await read_request(reader)
        writer.write(ok(hashlib.sha256(body).hexdigest().encode() if body else b"ok"))
        await writer.drain()


def test_keep_alive_reuses_one_connection() -> None:
    async def run() -> None:
        async with Server(keep_alive_server) as srv:
            up = upstream(srv.port)
            for _ in range(5):
                assert await get(up) == b"ok"
            assert srv.connections == 1
            await up.close()

    asyncio.run(run())


def test_a_closed_exchange_is_freed_without_the_garbage_collector() -> None:
    # A response's parser holds its callbacks: unless close() breaks that cycle, every
    # request leaves a dozen objects for a generation-0 collection (a pause every ~30).
    async def run() -> None:
        async with Server(keep_alive_server) as srv:
            up = upstream(srv.port)
            assert await get(up) == b"ok"  # the pool's connection is made
            gc.collect()
            gc.disable()
            try:
                for _ in range(20):
                    assert await get(up) == b"ok"
                    assert await get(up, method="POST", body=b"x" * 100) != b"ok"
                assert gc.collect() == 0
            finally:
                gc.enable()
            await up.close()

    asyncio.run(run())


def test_pool_limit_queues_then_times_out() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await asyncio.sleep(0.3)
            writer.write(ok())
            await writer.drain()

    async def run() -> None:
        async with Server(slow) as srv:
            up = upstream(srv.port, pool_size=1, connect_timeout="1s")
            assert await asyncio.gather(get(up), get(up)) == [b"ok", b"ok"]
            assert srv.connections == 1  # the second request waited for the first's connection
            tight = upstream(srv.port, pool_size=1, connect_timeout="100ms")
            results = await asyncio.gather(get(tight), get(tight), return_exceptions=True)
            assert results[0] == b"ok"
            assert isinstance(results[1], UpstreamError) and results[1].kind == "connect_timeout"
            await up.close()
            await tight.close()

    asyncio.run(run())


def test_request_bodies_framed_bytes_chunked_and_declared() -> None:
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            seen.append(head.lower())
            writer.write(ok(hashlib.sha256(body).hexdigest().encode()))
            await writer.drain()

    async def parts(n: int) -> object:
        for i in range(n):
            yield b"x" * 1000 + str(i).encode()
            await asyncio.sleep(0)

    async def run() -> None:
        expected = hashlib.sha256(b"".join([b"x" * 1000 + str(i).encode() for i in range(50)]))
        async with Server(record) as srv:
            up = upstream(srv.port)
            assert (
                await get(up, method="POST", body=b"abc")
                == hashlib.sha256(b"abc").hexdigest().encode()
            )
            assert b"content-length: 3\r\n" in seen[-1]
            assert await get(up, method="POST", body=parts(50)) == expected.hexdigest().encode()
            assert b"transfer-encoding: chunked\r\n" in seen[-1]
            assert await get(up, method="POST") == hashlib.sha256(b"").hexdigest().encode()
            assert b"content-length: 0\r\n" in seen[-1]
            assert b"host: 127.0.0.1:%d\r\n" % srv.port in seen[-1]
            assert srv.connections == 1
            await up.close()

    asyncio.run(run())


def test_close_delimited_body_and_connection_close() -> None:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        if b"/until-close" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\npart one, ")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"part two")
        else:
            writer.write(ok(extra=b"connection: close\r\n"))
        await writer.drain()

    async def run() -> None:
        async with Server(closing) as srv:
            up = upstream(srv.port)
            assert await get(up, "/until-close") == b"part one, part two"
            assert await get(up) == b"ok"
            assert await get(up) == b"ok"
            assert srv.connections == 3  # none of them reused
            await up.close()

    asyncio.run(run())


def test_informational_answers_skipped_and_head_has_no_body() -> None:
    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            if head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + ok(b"final"))
            await writer.drain()

    async def run() -> None:
        async with Server(server) as srv:
            up = upstream(srv.port)
            resp = await up.request("HEAD", "/", [], None)
            assert resp.status == 200 and resp.content_length is None
            assert await resp.read() == b""
            resp.close()
            resp = await up.request("GET", "/", [], None)
            assert resp.status == 200
            assert await resp.read() == b"final"
            resp.close()
            assert srv.connections == 1
            await up.close()

    asyncio.run(run())


def test_large_answer_read_slowly_arrives_whole() -> None:
    blob = bytes(range(256)) * 16 * 1024  # 4 MiB: well over the read high-water mark

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(blob))
        await writer.drain()

    async def run() -> None:
        async with Server(big) as srv:
            up = upstream(srv.port)
            resp = await up.request("GET", "/", [], None)
            got = bytearray()
            async for chunk in resp.chunks():
                got += chunk
                await asyncio.sleep(0.001)
            resp.close()
            assert resp.error_kind is None
            assert hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()
            await up.close()

    asyncio.run(run())


async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers one request, then reads the next and hangs up without answering: the keep-alive
    race where the upstream closes just as the gateway reuses the connection."""
    await read_request(reader)
    writer.write(ok())
    await writer.drain()
    await read_request(reader)


def test_stale_pooled_connection_replays_safe_requests_only() -> None:
    async def run() -> None:
        async with Server(answer_once) as srv:
            up = upstream(srv.port)
            assert await get(up) == b"ok"
            assert await get(up) == b"ok"  # replayed on a new connection
            assert srv.connections == 2
            with pytest.raises(UpstreamError) as err:
                await get(up, method="POST", body=b"x")
            assert err.value.kind == "reset"
            await up.close()

    asyncio.run(run())


def test_idle_connections_closed_after_keepalive() -> None:
    async def run() -> None:
        done = asyncio.Event()

        async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(ok())
            await writer.drain()
            assert await reader.read() == b""  # EOF: the client closed the idle connection
            done.set()

        async with Server(server) as srv:
            up = upstream(srv.port, keepalive="200ms")
            assert await get(up) == b"ok"
            await asyncio.wait_for(done.wait(), 2)
            await up.close()

    asyncio.run(run())


def test_read_timeout_between_chunks_and_split_headers_refused() -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    async def run() -> None:
        async with Server(stall) as srv:
            up = upstream(srv.port, timeout="200ms")
            resp = await up.request("GET", "/", [], None)
            chunks = [c async for c in resp.chunks()]
            assert chunks == [b"abc"] and resp.error_kind == "timeout"
            resp.close()
            with pytest.raises(UpstreamError) as err:
                await up.request("GET", "/", [(b"x-user", b"a\r\nx-admin: 1")], None)
            assert err.value.kind == "protocol"
            await up.close()

    asyncio.run(run())


def test_https_upstream_verified_against_trust_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, ctx = make_tls(tmp_path)

    async def run() -> None:
        server = await asyncio.start_server(keep_alive_server, "127.0.0.1", 0, ssl=ctx)
        port = server.sockets[0].getsockname()[1]
        untrusted = upstream(port, scheme="https")
        with pytest.raises(UpstreamError) as err:
            await get(untrusted)
        assert err.value.kind == "refused"  # certificate not trusted: never sent
        await untrusted.close()
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # the system trust store, as in a pod
        trusted = upstream(port, scheme="https")
        assert await get(trusted) == b"ok"
        assert await get(trusted) == b"ok"
        await trusted.close()
        server.close()

    asyncio.run(run())


def test_replay_goes_to_a_new_connection_when_the_pool_is_stale() -> None:
    async def run() -> None:
        async with Server(answer_once) as srv:
            up = upstream(srv.port)
            assert await asyncio.gather(get(up), get(up)) == [b"ok", b"ok"]  # two pooled
            assert srv.connections == 2
            assert await get(up) == b"ok"  # stale, then replayed on a new one, not the other
            await up.close()

    asyncio.run(run())
