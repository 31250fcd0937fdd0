"""The JWKS fetcher: keys from the identity provider over HTTPS, kept fresh, never hammered.

* Fetched at start (pipeline start waits for it, at most :data:`FETCH_TIMEOUT`; a failure
  does not stop the gateway, ``/readyz`` reports it), then every ``jwks_refresh`` (every
  ``min(refresh, max(cooldown, 1s))`` while the last attempt failed), and on an unknown
  ``kid`` at most once per ``jwks_cooldown`` whatever the number of such tokens: a flood of
  random ``kid`` values costs the identity provider one request per cooldown. Requests
  needing that refetch share it and wait for it (at most :data:`FETCH_TIMEOUT`).
* HTTPS only (the policy schema refuses other URLs), verified against ``jwks_ca`` or the
  system trust store; redirects are not followed; documents over 1 MiB are refused.
* When a fetch fails the last good key set is kept until ``jwks_max_stale`` after the last
  success; then, or before any success, the keys are unusable and requests needing them get
  503 ``auth_unavailable`` (not 401: the token may well be fine). The last good set also
  survives a policy reload (it is remembered per URL in this process).
* A fetched set that differs from the one in use (by key fingerprints) notifies the
  ``on_rotate`` listeners: the verified-token caches are cleared.
* Symmetric (``oct``) and private keys in a JWKS are skipped, as are keys it cannot use; a
  document with no usable key counts as a failed fetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
import time
import weakref
from collections.abc import Callable

import aiohttp

from gateway.auth.keys import KeySet, jwks_keys
from gateway.telemetry import metrics

log = logging.getLogger("gateway.auth.jwks")

FETCH_TIMEOUT = 5.0
MAX_DOCUMENT_BYTES = 1024 * 1024
_LAST_GOOD: dict[tuple[str, str | None], tuple[KeySet, float]] = {}
_LIVE: weakref.WeakSet[JwksFetcher] = weakref.WeakSet()
_OK = metrics.JWKS_FETCHES.labels("success")
_FAILED = metrics.JWKS_FETCHES.labels("failure")


def _worst_age() -> float:
    return max((f.age() for f in list(_LIVE)), default=0.0)


metrics.observe(metrics.JWKS_AGE, _worst_age)


def ssl_context(ca: str | None) -> ssl.SSLContext:
    """A verifying client context trusting ``ca`` (a PEM bundle) or the system store."""
    try:
        return ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"auth.jwks_ca: cannot load {ca}: {exc}") from None


class JwksFetcher:
    """One JWKS URL: the current key set, its freshness and the refresh task."""

    def __init__(
        self,
        url: str,
        ca: str | None,
        refresh: float,
        cooldown: float,
        max_stale: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.refresh = refresh
        self.cooldown = cooldown
        self.max_stale = max_stale
        self._ca = ca
        self._ssl = ssl_context(ca)
        self._clock = clock
        self._created = clock()
        self.keys: KeySet | None = None
        self.usable_until = -math.inf
        """Monotonic time until which :attr:`keys` may be used."""
        self.fetched_at: float | None = None
        last = _LAST_GOOD.get((url, ca))
        if last is not None:
            self.keys, self.fetched_at = last
            self.usable_until = self.fetched_at + max_stale
        self.failing = False
        self._last_attempt = -math.inf
        self._inflight: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[], None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        _LIVE.add(self)

    def usable(self) -> bool:
        """True while a key set is present and not stale past ``max_stale``."""
        return self._clock() <= self.usable_until

    def age(self) -> float:
        """Seconds since the last successful fetch (since creation when there was none)."""
        return self._clock() - (self.fetched_at if self.fetched_at is not None else self._created)

    def on_rotate(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever the key set changes."""
        self._listeners.append(listener)

    def readiness(self) -> str | None:
        """None when the keys are usable, else a short reason for ``/readyz``."""
        if self.usable():
            return None
        return "no JWKS key set yet" if self.keys is None else "JWKS key set is stale"

    def install(self, document: bytes) -> bool:
        """Use the keys of ``document``; True when they differ from those in use. Raises
        ValueError when the document holds no usable key (the old keys stay)."""
        keys, skipped = jwks_keys(document)
        for reason in skipped:
            log.warning("JWKS key skipped", extra={"url": self.url, "reason": reason})
        if not keys:
            raise ValueError("no usable key in the JWKS")
        keyset = KeySet(keys)
        rotated = self.keys is None or keyset.fingerprint != self.keys.fingerprint
        now = self._clock()
        if rotated:
            self.keys = keyset
        self.fetched_at = now
        self.usable_until = now + self.max_stale
        _LAST_GOOD[(self.url, self._ca)] = (self.keys or keyset, now)
        if rotated:
            log.info("JWKS keys loaded", extra={"url": self.url, "keys": len(keyset)})
            for listener in self._listeners:
                listener()
        return rotated

    async def start(self) -> None:
        """Fetch once (a failure is logged, not raised) and start the refresh loop."""
        connector = aiohttp.TCPConnector(ssl=self._ssl, limit=2)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
        )
        await self._fetch_shared()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        """Stop the refresh loop and close the HTTP session."""
        for task in (self._task, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._session is not None:
            await self._session.close()
        _LIVE.discard(self)

    async def refetch(self) -> bool:
        """Refetch for an unknown ``kid`` unless a fetch started within the cooldown (one
        running is joined); True when a fetch completed in time."""
        if self._session is None:
            return False
        running = self._inflight is not None and not self._inflight.done()
        if not running and self._clock() - self._last_attempt < self.cooldown:
            return False
        try:
            await asyncio.wait_for(self._fetch_shared(), FETCH_TIMEOUT)
        except TimeoutError:
            return False
        return True

    async def _fetch_shared(self) -> None:
        if self._inflight is None or self._inflight.done():
            self._last_attempt = self._clock()
            self._inflight = asyncio.get_running_loop().create_task(self._fetch())
        await asyncio.shield(self._inflight)

    async def _loop(self) -> None:
        while True:
            delay = self.refresh
            if self.failing:
                delay = min(self.refresh, max(self.cooldown, 1.0))
            await asyncio.sleep(delay)
            await self._fetch_shared()

    async def _fetch(self) -> None:
        assert self._session is not None
        try:
            async with self._session.get(self.url, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP status {resp.status}")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise ValueError("document larger than 1 MiB")
            self.install(bytes(body))
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            self.failing = True
            _FAILED.inc()
            reason = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            stale = "keeping the last good keys" if self.usable() else "no usable keys"
            log.warning("JWKS fetch failed; %s", stale, extra={"url": self.url, "error": reason})
            return
        self.failing = False
        _OK.inc()
