"""A lean Redis client for the limit script: one pipelined connection, RESP parsed by hiredis.

Why: every request makes one ``EVALSHA`` (and one more to settle its usage), and redis-py
spent ~215 µs of CPU on each (command packing, connection pool, retry wrapper, stream
writer) against ~65 µs here (``python -m bench.ratelimit --client``, same machine, same run).
Redis answers one connection's commands in order, so one connection carries every request's
command; commands issued in the same event-loop turn go out in one write.

Used for ``redis://`` and ``rediss://`` (and the master found through Sentinel); Cluster keeps
redis-py, which routes by slot. A timed-out call leaves its reply to be read and dropped, so
replies stay matched to commands; a connection that breaks fails every call waiting on it and
the next call opens a new one.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import hiredis

log = logging.getLogger("gateway.state")

Arg = bytes | str | int
Command = bytes | Callable[[], bytes]
"""A packed command, or what packs it when it is written."""
Resolver = Callable[[], Awaitable[tuple[str, int]]]

#: Calls waiting on one connection beyond which it is presumed stuck and dropped.
MAX_WAITING = 10_000


class RespError(Exception):
    """Redis answered with an error reply."""


def pack(args: Sequence[Arg]) -> bytes:
    """One command in RESP (an array of bulk strings), packed by hiredis (3x the pure-Python
    packer on the limit script's 25 arguments)."""
    # hiredis' stub types the argument as a one-element tuple
    packed: bytes = hiredis.pack_command(tuple(args))  # type: ignore[arg-type]
    return packed


#: Arguments whose RESP form :func:`pack_script` keeps at most (then it starts over).
MAX_PACKED_ARGS = 4096
_PACKED: dict[str | int, bytes] = {}


def pack_script(args: Sequence[Arg]) -> bytes:
    """:func:`pack` for the limit script's calls, whose arguments recur call after call (the
    keys of a client, the limits, periods and amounts): each string's or integer's RESP form
    is kept, so only new ones are formatted. hiredis formats every argument and its length
    with ``sprintf`` each time: ~20k of the ~140k user-space instructions of a lone call."""
    cache = _PACKED
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        kind = type(arg)
        if kind is str or kind is int:  # not bool or float: True == 1 == 1.0 as dict keys
            packed = cache.get(arg)  # type: ignore[arg-type]
            if packed is None:
                packed = _bulk(arg)
                if len(cache) >= MAX_PACKED_ARGS:
                    cache.clear()
                cache[arg] = packed  # type: ignore[index]
        else:
            packed = _bulk(arg)
        parts.append(packed)
    return b"".join(parts)


def _bulk(arg: Arg) -> bytes:
    raw = arg if isinstance(arg, bytes) else str(arg).encode()
    return b"$%d\r\n%s\r\n" % (len(raw), raw)


class _Connection(asyncio.Protocol):
    __slots__ = ("_buf", "_reader", "closed", "loop", "transport", "waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._reader = hiredis.Reader()
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.WriteTransport | None = None
        self.closed = False
        self._buf: list[Command] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        while True:
            reply = reader.gets()
            if reply is False:
                return
            if not self.waiters:
                self.abort()  # a reply nobody asked for: the stream is out of step
                return
            fut = self.waiters.popleft()
            if fut.done():
                continue  # its caller timed out; the reply is dropped, order is kept
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(RespError(str(reply)))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail()

    def _fail(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(ConnectionError("redis connection lost"))

    def send(self, data: Command) -> asyncio.Future[Any]:
        """Queue a command; it goes out with the others of this loop turn, in order. A
        callable is called for its bytes only then (a batch can grow until its turn ends)."""
        fut = self.loop.create_future()
        self.waiters.append(fut)
        if not self._buf:
            self.loop.call_soon(self._flush)
        self._buf.append(data)
        if len(self.waiters) > MAX_WAITING:
            self.abort()
        return fut

    def _flush(self) -> None:
        data, self._buf = self._buf, []
        if self.transport is not None and not self.closed:
            try:
                out = [d if isinstance(d, bytes) else d() for d in data]
            except Exception:
                log.exception("a Redis command could not be built; connection dropped")
                self.abort()  # fail its callers rather than leave them waiting
                return
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def abort(self) -> None:
        """Drop the connection and fail whoever waits on it."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self._fail()


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError("redis reply timed out"))


class LeanRedis:
    """The few commands the store needs, over one lazily (re)opened connection."""

    def __init__(
        self,
        resolve: Resolver,
        *,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        tls: ssl.SSLContext | None = None,
        connect_timeout: float = 1.0,
    ) -> None:
        """``resolve`` gives the address to connect to (asked again on every reconnect,
        which is how a Sentinel failover is followed)."""
        self._resolve = resolve
        self._auth: list[Arg] | None = None
        if password is not None:
            self._auth = [b"AUTH", username, password] if username else [b"AUTH", password]
        self._db = db
        self._tls = tls
        self._connect_timeout = connect_timeout
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done():
                self._connecting = None

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            host, port = await self._resolve()
            _, conn = await loop.create_connection(
                lambda: _Connection(loop),
                host,
                port,
                ssl=self._tls,
                server_hostname=host if self._tls is not None else None,
            )
            setup = []
            if self._auth is not None:
                setup.append(conn.send(pack(self._auth)))
            if self._db:
                setup.append(conn.send(pack([b"SELECT", self._db])))
            try:
                await asyncio.gather(*setup)
            except BaseException:
                conn.abort()
                raise
        self._conn = conn
        return conn

    async def call(self, *args: Arg, deadline: float | None = None) -> Any:
        """Send one command and wait for its reply; raises RespError or ConnectionError, and
        TimeoutError once the loop's clock passes ``deadline`` (connecting included)."""
        return await self._call(pack(args), deadline)

    async def _call(self, command: Command, deadline: float | None) -> Any:
        conn = self._conn
        if conn is None or conn.closed:
            if deadline is None:
                conn = await self._connection()
            else:
                async with asyncio.timeout_at(deadline):
                    conn = await self._connection()
        fut = conn.send(command)
        # A timer on the reply, not asyncio.timeout: that one costs ~8 µs a call in task
        # cancellation machinery; a late reply is still read and dropped, keeping the order.
        timer = conn.loop.call_at(deadline, _expire, fut) if deadline is not None else None
        try:
            return await fut
        except RespError as exc:
            if str(exc).startswith(("READONLY", "LOADING", "MASTERDOWN")):
                conn.abort()  # a failed-over master or a restarting one: find the new one
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def evalsha(
        self,
        sha: str,
        script: str,
        keys: Sequence[str],
        args: Sequence[Arg],
        deadline: float | None = None,
    ) -> Any:
        """Run a script by its hash, loading it (``EVAL``) when Redis does not have it."""
        return await self.evalsha_built(sha, script, lambda: (keys, args), deadline)

    async def evalsha_built(
        self,
        sha: str,
        script: str,
        build: Callable[[], tuple[Sequence[str], Sequence[Arg]]],
        deadline: float | None = None,
    ) -> Any:
        """:meth:`evalsha` with the keys and arguments from ``build``, called once, when the
        command is written: until then the caller may still add to what it will return."""
        built: list[tuple[Sequence[str], Sequence[Arg]]] = []

        def command(name: bytes, body: str) -> Callable[[], bytes]:
            def packed() -> bytes:
                if not built:
                    built.append(build())
                keys, args = built[0]
                return pack_script([name, body, len(keys), *keys, *args])

            return packed

        try:
            return await self._call(command(b"EVALSHA", sha), deadline)
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self._call(command(b"EVAL", script), deadline)

    async def ping(self) -> None:
        """Round trip to Redis."""
        await self.call(b"PING")

    async def aclose(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            self._conn.abort()
            self._conn = None
