"""The forwarding client: pooled keep-alive connections, streaming, timeouts, error mapping.

aiohttp is the client because it measured ~10x httpx's default pool on this hop
(see ``bench/upstream_clients.py``). Its errors are translated here and nowhere else.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from gateway.errors import UpstreamError
from gateway.policy.sections import UpstreamConfig

_REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS"})


def translate(exc: BaseException) -> UpstreamError:
    """Map a client library error to the gateway's upstream error (status, type, kind)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamError(
            503, "upstream_connect_timeout", "upstream connect timed out", "connect_timeout"
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError(
            502, "upstream_unavailable", "upstream refused the connection", "refused"
        )
    if isinstance(exc, aiohttp.ServerTimeoutError | asyncio.TimeoutError | TimeoutError):
        return UpstreamError(504, "upstream_timeout", "upstream did not answer in time", "timeout")
    if isinstance(
        exc,
        aiohttp.ServerDisconnectedError
        | aiohttp.ClientOSError
        | aiohttp.ClientPayloadError
        | ConnectionError,
    ):
        return UpstreamError(502, "upstream_reset", "upstream closed the connection", "reset")
    return UpstreamError(
        502, "upstream_protocol_error", "upstream sent an invalid answer", "protocol"
    )


class UpstreamResponse:
    """An upstream answer being streamed; always ``close()`` it."""

    __slots__ = ("_resp", "abandoned", "error_kind", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = resp.raw_headers
        #: Set when the body stream broke off (reset, timeout): the client's stream just ends.
        self.error_kind: str | None = None
        #: Set when the gateway stopped reading before the end: the connection is dropped.
        self.abandoned = False

    @property
    def content_length(self) -> int | None:
        """Declared body length, if the upstream gave one."""
        return self._resp.content_length

    async def read(self) -> bytes:
        """The whole body (for bounded, declared-length bodies); raises UpstreamError."""
        try:
            return await self._resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise translate(exc) from None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; ends quietly (``error_kind`` set) when the upstream breaks."""
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self.error_kind = translate(exc).kind

    def close(self, reusable: bool = True) -> None:
        """Return the connection to the pool, or drop it when the body was not read to the end."""
        if reusable and self.error_kind is None and not self.abandoned:
            self._resp.release()
        else:
            self._resp.close()


class Upstream:
    """A pooled HTTP/1.1 client for one upstream base URL."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.cfg = cfg
        self.base = cfg.url.rstrip("/")
        url = URL(cfg.url)
        self.host = url.host or "127.0.0.1"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=cfg.connect_timeout,
            sock_connect=cfg.connect_timeout,
            sock_read=cfg.timeout,
        )
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self.cfg.pool_size,
            limit_per_host=0,
            keepalive_timeout=self.cfg.keepalive,
            ttl_dns_cache=300,
            enable_cleanup_closed=False,
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )

    async def request(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterable[bytes] | None,
    ) -> UpstreamResponse:
        """Send the request (``target`` is the raw path and query); raises UpstreamError."""
        if self._session is None:
            self._session = self._open()
        url = URL(self.base + target, encoded=True)
        attempts = 2 if method in _REPLAYABLE and not isinstance(body, AsyncIterable) else 1
        for attempt in range(attempts):
            try:
                resp = await self._session.request(
                    method,
                    url,
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                )
                return UpstreamResponse(resp)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # A pooled keep-alive connection the upstream closed just as we reused it:
                # replaying a safe, bodiless request once is what nginx and Envoy do too.
                if attempt + 1 >= attempts or isinstance(exc, aiohttp.ClientConnectorError):
                    raise translate(exc) from None
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
                raise translate(exc) from None
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
        if self._session is not None:
            await self._session.close()
            self._session = None
