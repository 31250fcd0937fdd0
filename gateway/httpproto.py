"""The client-facing HTTP/1.1 protocol: uvicorn's httptools protocol with the gateway's bounds.

uvicorn answers what it cannot parse with a plain-text 400, keeps a connection that never
finishes its headers open forever, buffers request heads without limit and waits on a
stalled body for as long as the client likes. This subclass adds, per connection:

- the JSON error shape (:mod:`gateway.errors`) for everything the server answers itself;
- ``max_connections``: one connection too many gets a 503 ``overloaded`` and is closed;
- ``header_read_timeout``: the head must be complete this long after the connection opened
  (or after the request's first byte on a kept-alive connection), else 408 / close;
- the head bounded while it arrives (``max_header_bytes`` plus :data:`MAX_REQUEST_LINE`
  of raw bytes; the target by :data:`MAX_REQUEST_LINE`, 414), so an endless head is refused
  without being buffered; ``max_header_count`` once it is in (the exact ``max_header_bytes``
  check is the app's 431, counted the same way);
- ``body_read_timeout``: a body the app is waiting for must keep arriving, else 408 / close.

Timers are cheap on the hot path: one deadline per connection is checked lazily (a timer
that fires early re-arms itself for what is left) instead of a timer per chunk.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway.corked import CorkedTransport
from gateway.errors import Deny, error_response
from gateway.headers import request_id_from
from gateway.policy.schema import Policy
from gateway.telemetry import metrics

log = logging.getLogger("gateway.http")

#: Longest request line target (path and query); longer → 414 ``uri_too_long``.
MAX_REQUEST_LINE = 8192
#: Bytes allowed in a head beyond the header limit (request line, separators) before the
#: connection is refused even though no callback has seen a complete oversized header yet.
_HEAD_SLACK = MAX_REQUEST_LINE + 1024
#: After an early answer (413, 408), how much of the unread body is discarded, for how long,
#: before the connection is closed; an answer that kept the connection reads and drops a
#: rest of the body up to this size, and keeps the connection.
LINGER_BYTES = 1024 * 1024
LINGER_SECONDS = 2.0
#: How long a connection over ``max_connections`` may take to send anything before it is
#: dropped without an answer.
_REFUSE_GRACE = 1.0
#: Spread of the per-connection deadlines (header timeout, refusal grace), as a fraction.
_JITTER = 0.1


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The per-connection bounds, read from the policy in use when a connection opens."""

    max_connections: int = 4096
    max_header_bytes: int = 16 * 1024
    max_header_count: int = 100
    header_read_timeout: float = 10.0
    body_read_timeout: float = 30.0


class _Reject(Exception):
    """Raised inside a parser callback: answer ``deny`` and close the connection."""

    def __init__(self, deny: Deny) -> None:
        super().__init__(deny.type)
        self.deny = deny


def error_bytes(deny: Deny, request_id: str | None = None) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 answer in the gateway's JSON error shape."""
    rid = request_id or request_id_from(None)
    status, headers, body = error_response(deny, rid)
    lines = [STATUS_LINE[status]]
    lines.extend(k + b": " + v + b"\r\n" for k, v in headers)
    lines.append(b"connection: close\r\n\r\n")
    lines.append(body)
    return b"".join(lines)


OVERLOADED = Deny(
    503,
    "overloaded",
    "the gateway is at its connection limit; retry later",
    ((b"retry-after", b"1"),),
)
_TIMEOUT = Deny(408, "request_timeout", "the request was not received in time")


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the gateway's connection bounds and error shape.

    Use :func:`protocol_class` to bind it to the live policy."""

    limits_source: Callable[[], ConnectionLimits] = ConnectionLimits

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lim = type(self).limits_source()
        self._refusing = False
        self._lingering = False
        self._linger_budget = 0
        self._head_since: float | None = None  # loop time the pending head began; None: none
        self._head_raw = 0
        self._head_limit = self._lim.max_header_bytes + _HEAD_SLACK
        # Each connection's deadline is spread over +0..10 %: connections a flood opened
        # together then expire over a spell instead of in one burst of callbacks.
        self._head_timeout = self._lim.header_read_timeout * (1.0 + _JITTER * random.random())
        self._done_headers: list[tuple[bytes, bytes]] | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_wait = False
        self._body_last = 0.0
        self._body_seen = 0  # body bytes of the current request so far
        self._body_timer: asyncio.TimerHandle | None = None

    # -- connection ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Count the connection; over ``max_connections`` it is only answered 503 and closed."""
        super().connection_made(transport)
        # Flow control (pause/resume reading) keeps the real transport; writes are corked.
        self.transport = CorkedTransport(transport, self.loop)  # type: ignore[assignment]
        if len(self.connections) > self._lim.max_connections:
            self._refusing = True
            metrics.REQUEST_ERRORS.labels("overloaded").inc()
            grace = _REFUSE_GRACE * (1.0 + _JITTER * random.random())
            self._head_timer = self.loop.call_later(grace, self._abort)
            return
        self._head_since = self.loop.time()
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        """Cancel this connection's timers."""
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None
        self._body_wait = False
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed the parser; answer what cannot be parsed or is over a bound in JSON, close."""
        if self._lingering or self._refusing:
            self._special(data)
            return
        self._unset_keepalive_if_required()
        if self._head_since is not None:
            self._head_raw += len(data)
        headers = self.headers
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, _Reject):
                self._answer_and_close(cause.deny, self._rid())
                return
            raise
        except httptools.HttpParserError:
            # smuggling attempts (CL+TE, duplicate Content-Length), obs-fold, bad bytes...
            # llhttp's message names the detail; the client gets a stable answer instead.
            deny = Deny(400, "invalid_request", "the request is not valid HTTP/1.1")
            self._answer_and_close(deny, None)
            return
        except httptools.HttpParserUpgrade:
            # No upgrades are proxied (ws="none"): the request is served as a plain one and
            # the connection is closed after it, since the parser stopped at the upgrade.
            if self.cycle is not None:
                self.cycle.keep_alive = False
            return
        if (
            self._head_since is None
            and self.headers is not headers
            and self.headers is not self._done_headers
        ):
            # A new request began in this data and its head is not complete yet: its clock
            # starts now (uvicorn makes a new header list per request).
            self._head_since = self.loop.time()
            self._head_raw = len(data)
            if self._head_timer is None:
                self._arm_head_timer()
        if self._head_since is not None and self._head_raw > self._head_limit:
            self._answer_and_close(self._too_large(), self._rid())
            return
        if self._body_wait and self._body_timer is None:
            self._body_timer = self.loop.call_later(self._lim.body_read_timeout, self._body_check)

    def _special(self, data: bytes) -> None:
        if self._lingering:
            self._linger_budget -= len(data)
            if self._linger_budget < 0:
                self._abort()
        else:  # refusing, not parsed: only the request id is looked for
            self._answer_and_close(OVERLOADED, _raw_request_id(data))

    def send_400_response(self, msg: str) -> None:
        """uvicorn's plain-text 400, in the JSON shape."""
        self._answer_and_close(
            Deny(400, "invalid_request", "the request is not valid HTTP/1.1"), None
        )

    # -- parser callbacks ----------------------------------------------------------------

    def on_headers_complete(self) -> None:
        """The head is in: stop its clock, bound the number of fields (their total size is
        the app's 431, from the same count); a body (if any) now has its own clock."""
        self._head_since = None
        self._done_headers = self.headers
        if len(self.url) > MAX_REQUEST_LINE:
            raise _Reject(
                Deny(
                    414,
                    "uri_too_long",
                    f"the request target is longer than {MAX_REQUEST_LINE} bytes",
                )
            )
        if len(self.headers) > self._lim.max_header_count:
            raise _Reject(
                Deny(
                    431,
                    "headers_too_large",
                    f"more than {self._lim.max_header_count} request headers",
                )
            )
        super().on_headers_complete()
        self._body_wait = True
        self._body_last = self.loop.time()
        self._body_seen = 0

    def on_body(self, body: bytes) -> None:
        """Body bytes arrived: the client is alive. Once the answer is complete (an early
        413, 401, 429...), the rest of the body is dropped: read, while the answer kept the
        connection and what is left is small; else the connection is closed (lingering)."""
        self._body_last = self.loop.time()
        seen = self._body_seen
        self._body_seen = seen + len(body)
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and not self._lingering:
            # The answer did not say "connection: close", so the client may already be
            # sending its next request on this connection: closing would lose it.
            declared = self._declared_length()
            if not (cycle.keep_alive and declared is not None and declared - seen <= LINGER_BYTES):
                self._linger()
            return
        super().on_body(body)

    def _declared_length(self) -> int | None:
        """The request's Content-Length; None when it has none (chunked)."""
        for name, value in self.headers:
            if name == b"content-length":
                return int(value)  # llhttp accepted it: digits, no duplicates
        return None

    def on_message_complete(self) -> None:
        """The whole request is in."""
        self._body_wait = False
        super().on_message_complete()

    # -- timers --------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self._head_timeout, self._head_check)

    def _head_check(self) -> None:
        self._head_timer = None
        if self._head_since is None or self.transport.is_closing():
            return
        left = self._head_since + self._head_timeout - self.loop.time()
        if left > 0:
            self._head_timer = self.loop.call_later(left, self._head_check)
            return
        metrics.REQUEST_ERRORS.labels("request_timeout").inc()
        if self._head_raw:
            _warn("request headers not received in time", self.client)
            self._answer_and_close(_TIMEOUT, None)
        else:  # an idle connection that never sent a byte: nobody to answer
            self.transport.close()

    def _body_check(self) -> None:
        self._body_timer = None
        if not self._body_wait or self.transport.is_closing():
            return
        now = self.loop.time()
        if self.flow.read_paused:
            # the app is not reading (its upstream is slow): not the client's stall
            self._body_last = now
        left = self._body_last + self._lim.body_read_timeout - now
        if left > 0:
            self._body_timer = self.loop.call_later(left, self._body_check)
            return
        metrics.REQUEST_ERRORS.labels("request_timeout").inc()
        _warn("request body stalled", self.client)
        cycle = self.cycle
        started = cycle is not None and cycle.response_started
        if cycle is not None:
            # The app's receive() now returns http.disconnect and its sends are dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        if started:
            self.transport.close()
        else:
            self._answer_and_close(_TIMEOUT, self._rid())

    def _linger(self) -> None:
        # Closing at once with unread bytes makes the kernel send a reset, which can destroy
        # the answer before the client reads it. So: no more writes (FIN), discard at most
        # LINGER_BYTES for at most LINGER_SECONDS, then close (as nginx's lingering_close).
        self._lingering = True
        self._linger_budget = LINGER_BYTES
        self._body_wait = False
        if self.transport.can_write_eof():
            self.transport.write_eof()
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(LINGER_SECONDS, self._abort)

    def _abort(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    # -- helpers -------------------------------------------------------------------------

    def _too_large(self) -> Deny:
        return Deny(
            431,
            "headers_too_large",
            f"request headers are larger than {self._lim.max_header_bytes} bytes",
        )

    def _rid(self) -> str | None:
        for k, v in self.headers or ():
            if k == b"x-request-id":
                return request_id_from(v)
        return None

    def _answer_and_close(self, deny: Deny, request_id: str | None) -> None:
        self._head_since = None
        self._body_wait = False
        if self.transport.is_closing():
            return
        if deny.type != "overloaded" and deny.type != "request_timeout":
            metrics.REQUEST_ERRORS.labels(deny.type).inc()
        self.transport.write(error_bytes(deny, request_id))
        self.transport.close()


_RID = re.compile(rb"\r\nx-request-id:[ \t]*([^\r\n]*?)[ \t]*\r\n", re.IGNORECASE)


def _raw_request_id(data: bytes) -> str | None:
    m = _RID.search(data, 0, 16384)
    return request_id_from(m.group(1)) if m else None


#: Connection-level warnings are logged at most once per this many seconds and kind, with
#: the number suppressed meanwhile: an attacker must not turn each 408 into a log write.
WARN_EVERY = 1.0
_warned: dict[str, tuple[float, int]] = {}


def _warn(message: str, client: tuple[str, int] | None) -> None:
    now = time.monotonic()
    last, suppressed = _warned.get(message, (0.0, 0))
    if now - last < WARN_EVERY:
        _warned[message] = (last, suppressed + 1)
        return
    _warned[message] = (now, 0)
    log.warning(message, extra={"client": client, "suppressed_since_last": suppressed})


def protocol_class(limits: Callable[[], ConnectionLimits]) -> type[GatewayHttpProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, reading ``limits`` (the live
    policy's bounds) for each new connection."""
    return type(
        "BoundGatewayHttpProtocol", (GatewayHttpProtocol,), {"limits_source": staticmethod(limits)}
    )


_cached: tuple[object, ConnectionLimits] | None = None


def limits_of(policy: Policy) -> ConnectionLimits:
    """The connection bounds of ``policy`` (computed once per policy object)."""
    global _cached
    if _cached is not None and _cached[0] is policy:
        return _cached[1]
    limits = ConnectionLimits(
        max_connections=policy.max_connections,
        max_header_bytes=policy.max_header_bytes,
        max_header_count=policy.max_header_count,
        header_read_timeout=policy.header_read_timeout,
        body_read_timeout=policy.body_read_timeout,
    )
    _cached = (policy, limits)
    return limits
