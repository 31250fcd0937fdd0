"""The forwarding client for one upstream: request framing, replay, and the pool's errors.

The transport is :mod:`gateway.http1` (chosen by measurement over aiohttp and httpx, see
``bench/upstream_clients.py``); its errors are already the gateway's ``UpstreamError``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterable
from urllib.parse import urlsplit

from gateway.errors import UpstreamError
from gateway.http1 import Headers, Pool, Response, _Stale, request_head, reset_error
from gateway.policy.sections import UpstreamConfig

#: Requests replayed once when a pooled connection dies before the answer starts.
_REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

UpstreamResponse = Response
"""An upstream answer being streamed; always ``close()`` it."""


class Upstream:
    """A pooled HTTP/1.1 client for one upstream base URL."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.cfg = cfg
        url = urlsplit(cfg.url)
        self.host = url.hostname or "127.0.0.1"
        self.tls = url.scheme == "https"
        self.port = url.port or (443 if self.tls else 80)
        self.prefix = url.path.rstrip("/")
        default_port = (self.tls and self.port == 443) or (not self.tls and self.port == 80)
        netloc = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (netloc if default_port else f"{netloc}:{self.port}").encode()
        self._pool: Pool | None = None

    def _open(self) -> Pool:
        self._pool = Pool(
            self.host,
            self.port,
            tls=ssl.create_default_context() if self.tls else None,
            size=self.cfg.pool_size,
            connect_timeout=self.cfg.connect_timeout,
            read_timeout=self.cfg.timeout,
            keepalive=self.cfg.keepalive,
        )
        return self._pool

    async def request(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: bytes | AsyncIterable[bytes] | None,
    ) -> UpstreamResponse:
        """Send the request (``target`` is the raw path and query); raises UpstreamError.

        ``headers`` are lower-case names without framing headers for a ``bytes`` body: the
        length is set here. A streamed body keeps the client's Content-Length, else is chunked.
        """
        pool = self._pool or self._open()
        streamed = body is not None and not isinstance(body, bytes)
        chunked = False
        if isinstance(body, bytes):
            headers.append((b"content-length", b"%d" % len(body)))
        elif streamed:
            chunked = not any(k == b"content-length" for k, _ in headers)
            if chunked:
                headers.append((b"transfer-encoding", b"chunked"))
        elif method in _BODY_METHODS:
            headers.append((b"content-length", b"0"))
        head = request_head(method, self.prefix + target, headers, self.host_header)
        attempts = 2 if method in _REPLAYABLE and not streamed else 1
        for attempt in range(attempts):
            conn, _ = await pool.acquire(fresh=attempt > 0)
            resp = conn.send(head, body, method == "HEAD", chunked)
            try:
                await resp.wait_head()
                return resp
            except _Stale:
                # A pooled keep-alive connection the upstream closed just as we reused it:
                # replaying a safe, bodiless request once is what nginx and Envoy do too.
                resp.close(reusable=False)
                if attempt + 1 >= attempts:
                    raise reset_error() from None
            except BaseException:
                resp.close(reusable=False)
                raise
        raise AssertionError("unreachable")

    async def reachable(self, wait: float = 1.0) -> bool:
        """True when a TCP connection to the upstream opens within ``wait`` seconds."""
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), wait)
        except (TimeoutError, OSError):
            return False
        writer.close()
        return True

    async def close(self) -> None:
        """Close the pool."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None


__all__ = ["Upstream", "UpstreamError", "UpstreamResponse"]
