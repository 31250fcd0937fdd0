"""A lean pooled HTTP/1.1 client on asyncio protocols and httptools' response parser.

Why not aiohttp: on this hop aiohttp's request machinery (URL objects, multidicts, tracing
hooks, a writer task, a stream reader) cost ~40% of the gateway's CPU and capped the whole
proxy at ~2.5k req/s (``python -m bench.upstream_clients``). A proxy needs much less: bytes in,
bytes out, one parser callback object per exchange, a LIFO pool of keep-alive connections.

What it keeps from a full client: streaming both ways (chunked request bodies, response bodies
as they arrive, with read back-pressure), connect and read timeouts, keep-alive reuse only after
a complete exchange, one replay of a safe request when a pooled connection dies before the
answer starts, close-delimited bodies, 1xx skipping, HEAD, and TLS to ``https`` upstreams.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import cast

import httptools

from gateway.errors import UpstreamError

Headers = list[tuple[bytes, bytes]]

#: Response body bytes buffered before the socket stops being read (back-pressure).
READ_HIGH_WATER = 256 * 1024
_NO_BODY_STATUS = frozenset({204, 304})
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


def connect_timeout_error() -> UpstreamError:
    """No connection (new or pooled) within ``connect_timeout``: 503."""
    return UpstreamError(
        503, "upstream_connect_timeout", "upstream connect timed out", "connect_timeout"
    )


def refused_error() -> UpstreamError:
    """The connection could not be opened: 502."""
    return UpstreamError(502, "upstream_unavailable", "upstream refused the connection", "refused")


def timeout_error() -> UpstreamError:
    """No answer (or no next chunk) within ``timeout``: 504."""
    return UpstreamError(504, "upstream_timeout", "upstream did not answer in time", "timeout")


def reset_error() -> UpstreamError:
    """The upstream closed the connection: 502."""
    return UpstreamError(502, "upstream_reset", "upstream closed the connection", "reset")


def protocol_error() -> UpstreamError:
    """The upstream's bytes are not HTTP/1.1: 502."""
    return UpstreamError(
        502, "upstream_protocol_error", "upstream sent an invalid answer", "protocol"
    )


_ERRORS = {
    "timeout": timeout_error,
    "reset": reset_error,
    "protocol": protocol_error,
}


class _Stale(Exception):
    """The connection broke before any byte of the answer: a safe request may be replayed."""


_SPENT = httptools.HttpResponseParser(object())
"""The parser of every closed exchange (nothing feeds it: its connection has moved on)."""


class Response:
    """One exchange's answer; also the httptools callback object that fills it.

    The body is read with :meth:`chunks` (or :meth:`read`); always :meth:`close` it.
    """

    __slots__ = (
        "_body",
        "_buffered",
        "_conn",
        "_head",
        "_informational",
        "_until_close",
        "_waiter",
        "_writer",
        "abandoned",
        "complete",
        "content_length",
        "error_kind",
        "finished_at",
        "head_only",
        "headers",
        "keep_alive",
        "parser",
        "started",
        "status",
    )

    def __init__(self, conn: Connection, head_only: bool) -> None:
        self._conn = conn
        self.parser = httptools.HttpResponseParser(self)
        self.head_only = head_only
        self.status = 0
        self.headers: Headers = []
        self.content_length: int | None = None
        self.started = False  # a byte of the answer arrived
        self.complete = False
        #: ``perf_counter`` when the answer's last byte arrived (0.0 until then).
        self.finished_at = 0.0
        self.keep_alive = False
        #: Set when the body stream broke off (reset, timeout): the client's stream just ends.
        self.error_kind: str | None = None
        #: Set when the gateway stopped reading before the end: the connection is dropped.
        self.abandoned = False
        self._head: asyncio.Future[None] = conn.loop.create_future()
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._until_close = False
        self._informational = False
        self._writer: asyncio.Task[None] | None = None

    # httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.headers = []
        self.content_length = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        if len(name) == 14 and name.lower() == b"content-length":
            self.content_length = int(value) if value.isdigit() else None

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self._informational = True  # 100 Continue, 103 Early Hints: wait for the real one
            return
        self.status = status
        if self.head_only or status in _NO_BODY_STATUS:
            self.content_length = None if self.head_only else 0
            self._finish(self.parser.should_keep_alive())
        elif self.content_length is None and not self._chunked():
            self._until_close = True  # the body ends when the connection does
        if not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > READ_HIGH_WATER:
            self._conn.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if not self.complete:
            self._finish(self.parser.should_keep_alive())

    # connection events ---------------------------------------------------------------------

    def _chunked(self) -> bool:
        for k, v in self.headers:
            if len(k) == 17 and k.lower() == b"transfer-encoding":
                return b"chunked" in v.lower()
        return False

    def _finish(self, keep_alive: bool) -> None:
        self.complete = True
        self.finished_at = time.perf_counter()
        self.keep_alive = keep_alive and not self._until_close
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, kind: str) -> None:
        """The connection broke, timed out or sent garbage: wake whoever waits."""
        if self.complete:
            return
        if self.status and self._until_close and kind == "reset":
            self._finish(False)  # a close-delimited body ends here, complete
            return
        if self.error_kind is None:
            self.error_kind = kind
        if not self._head.done():
            if kind == "reset" and not self.started:
                self._head.set_exception(_Stale())
            else:
                self._head.set_exception(_ERRORS[kind]())
        self._wake()

    # the gateway's side --------------------------------------------------------------------

    async def wait_head(self) -> None:
        """Wait for the status line and headers; raises UpstreamError or _Stale."""
        if not self._head.done():
            timer = self._conn.loop.call_later(self._conn.read_timeout, self.fail, "timeout")
            try:
                await self._head
            finally:
                timer.cancel()
        else:
            self._head.result()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; ends quietly (``error_kind`` set) when the upstream breaks."""
        conn = self._conn
        while True:
            if self._body:
                chunk = self._body.popleft() if len(self._body) == 1 else b"".join(self._body)
                self._body.clear()
                self._buffered = 0
                conn.resume_reading()
                yield chunk
                continue
            if self.complete or self.error_kind is not None:
                return
            waiter = self._waiter = conn.loop.create_future()
            timer = conn.loop.call_later(conn.read_timeout, self.fail, "timeout")
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None

    async def read(self) -> bytes:
        """The whole body (for bounded, declared-length bodies); raises UpstreamError."""
        if self.complete and len(self._body) <= 1:
            body = self._body.popleft() if self._body else b""
            self._buffered = 0
            return body
        parts = [chunk async for chunk in self.chunks()]
        if self.error_kind is not None:
            raise _ERRORS.get(self.error_kind, reset_error)()
        return b"".join(parts)

    def close(self, reusable: bool = True) -> None:
        """Return the connection to the pool, or drop it when the exchange did not end cleanly."""
        writer = self._writer
        body_sent = writer is None or (writer.done() and not writer.cancelled())
        if writer is not None and not writer.done():
            writer.cancel()
        ok = reusable and self.complete and self.keep_alive and body_sent
        self._conn.release(ok and self.error_kind is None and not self.abandoned)
        # The parser holds this object's callbacks, a reference cycle: without it the exchange
        # is freed here rather than by the garbage collector (a dozen objects a request,
        # which set off a generation-0 collection every ~30 requests).
        self.parser = _SPENT


class Connection(asyncio.Protocol):
    """One keep-alive TCP (or TLS) connection to the upstream."""

    __slots__ = (
        "_drain",
        "_paused",
        "_reading_paused",
        "closed",
        "exchange",
        "idle_since",
        "loop",
        "pool",
        "read_timeout",
        "transport",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.read_timeout = pool.read_timeout
        self.transport: asyncio.Transport | None = None
        self.exchange: Response | None = None
        self.closed = False
        self.idle_since = 0.0
        self._paused = False
        self._reading_paused = False
        self._drain: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            self.abort()  # bytes nobody asked for: this connection cannot be trusted again
            return
        exchange.started = True
        try:
            exchange.parser.feed_data(data)
        except httptools.HttpParserError:
            exchange.fail("protocol")
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.exchange is not None:
            self.exchange.fail("reset")
        else:
            self.pool.forget_idle(self)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError())

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def drain(self) -> None:
        """Wait until the socket's write buffer is below its high-water mark."""
        if self.closed:
            raise ConnectionResetError()
        if self._paused:
            self._drain = self.loop.create_future()
            await self._drain

    def pause_reading(self) -> None:
        """Stop reading the socket until the buffered body is consumed."""
        if not self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read the socket again."""
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        """Drop the connection now."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def release(self, reusable: bool) -> None:
        """End the current exchange: back to the pool, or closed."""
        self.exchange = None
        if reusable and not self.closed:
            self.resume_reading()
            self.pool.put(self)
        else:
            self.abort()
            self.pool.discard(self)

    def send(
        self,
        head: bytes,
        body: bytes | AsyncIterable[bytes] | None,
        head_only: bool,
        chunked: bool,
    ) -> Response:
        """Write the request and start its exchange (the answer is awaited by the caller).

        A streamed ``body`` is written by a task, as the answer may start before it ends;
        ``chunked`` frames it (otherwise the head declared its length).
        """
        assert self.transport is not None
        resp = self.exchange = Response(self, head_only)
        if body is None or isinstance(body, bytes):
            self.transport.write(head + body if body else head)
        else:
            self.transport.write(head)
            writer = self.loop.create_task(self._stream(body, resp, chunked))
            writer.add_done_callback(_retrieve)
            resp._writer = writer
        return resp

    async def _stream(self, body: AsyncIterable[bytes], resp: Response, chunked: bool) -> None:
        assert self.transport is not None
        try:
            async for chunk in body:
                if chunk:
                    framed = b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk
                    self.transport.write(framed)
                    await self.drain()
            if chunked:
                self.transport.write(b"0\r\n\r\n")
        except asyncio.CancelledError:
            raise
        except Exception:
            # The client's body broke (client gone, too large) or the upstream went away:
            # the request is incomplete, so this connection can never be reused.
            resp.fail("reset")
            self.abort()
            raise


class Pool:
    """Keep-alive connections to one upstream, newest first, at most ``size`` open."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None,
        size: int,
        connect_timeout: float,
        read_timeout: float,
        keepalive: float,
    ) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.size = size
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive = keepalive
        self.loop = asyncio.get_running_loop()
        self.idle: list[Connection] = []
        self.open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.closing = False
        self._sweeper: asyncio.TimerHandle | None = None

    async def acquire(self, fresh: bool = False) -> tuple[Connection, bool]:
        """A connection and whether it was reused; raises UpstreamError. ``fresh``: a new
        one (a replay must not land on another pooled connection the upstream closed)."""
        deadline = None
        while True:
            now = self.loop.time()
            if fresh and self.idle and self.open >= self.size:
                # Full: make room by closing the oldest idle connection.
                conn = self.idle.pop(0)
                conn.abort()
                self.open -= 1
            while self.idle and not fresh:
                conn = self.idle.pop()
                if conn.closed or now - conn.idle_since > self.keepalive:
                    conn.abort()
                    self.open -= 1
                    continue
                return conn, True
            if self.open < self.size:
                break
            if deadline is None:
                deadline = now + self.connect_timeout
            if now >= deadline:
                raise connect_timeout_error()
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            timer = self.loop.call_later(deadline - now, _resolve, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
        self.open += 1
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: Connection(self),
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls is not None else None,
                ),
                self.connect_timeout,
            )
        except TimeoutError:
            self._freed()
            raise connect_timeout_error() from None
        except (OSError, ssl.SSLError, ValueError):
            self._freed()
            raise refused_error() from None
        except BaseException:
            self._freed()
            raise
        return conn, False

    def put(self, conn: Connection) -> None:
        """A connection whose exchange ended cleanly: keep it for the next request."""
        if self.closing:
            conn.abort()
            self._freed()
            return
        conn.idle_since = self.loop.time()
        self.idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.keepalive, self._sweep)
        self._wake_one()

    def discard(self, conn: Connection) -> None:
        """A connection that was closed: its slot is free."""
        self._freed()

    def _freed(self) -> None:
        self.open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def forget_idle(self, conn: Connection) -> None:
        """An idle connection the upstream closed: free its slot now."""
        try:
            self.idle.remove(conn)
        except ValueError:
            return  # already taken or dropped
        self._freed()

    def _sweep(self) -> None:
        # Idle connections older than ``keepalive`` are closed even when no request comes.
        self._sweeper = None
        cutoff = self.loop.time() - self.keepalive
        expired = [c for c in self.idle if c.idle_since <= cutoff]
        for conn in expired:
            self.idle.remove(conn)
            conn.abort()
            self._freed()
        if self.idle and not self.closing:
            self._sweeper = self.loop.call_later(self.keepalive, self._sweep)

    def close(self) -> None:
        """Close idle connections; busy ones close when their exchange ends."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.closing = True
        for conn in self.idle:
            conn.abort()
        self.open -= len(self.idle)
        self.idle.clear()


def _retrieve(task: asyncio.Task[None]) -> None:
    # The writer's failure is already reported through the exchange; don't log it again.
    if not task.cancelled():
        task.exception()


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def request_head(method: str, target: str, headers: Headers, host: bytes) -> bytes:
    """The request line and headers; raises UpstreamError for a header that would split.

    ``headers`` have lower-case names; ``host`` is added when they have no ``host``.
    """
    out = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1")]
    has_host = False
    for k, v in headers:
        if k == b"host":
            has_host = True
        out.append(b"%b: %b\r\n" % (k, v))
    if not has_host:
        out.append(b"host: %b\r\n" % host)
    out.append(b"\r\n")
    head = b"".join(out)
    # Every line ends with one CR LF: any other CR or LF would split a line. Counted once over
    # the head (a quarter of the cost of testing each header with ``in``).
    lines = len(out)
    if head.count(b"\n") != lines or head.count(b"\r") != lines:
        raise protocol_error()
    for k, _ in headers:
        if k.find(b":") >= 0:
            raise protocol_error()
    return head
