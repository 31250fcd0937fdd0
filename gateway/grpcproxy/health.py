"""``grpc.health.v1.Health`` answered by the gateway from its readiness (as ``/readyz``).

Every service name gets the gateway's own status: the gateway forwards every service of the
upstream, so it is ready for one exactly when it is ready at all. ``SERVING`` when the
readiness checks pass; ``NOT_SERVING`` while one fails or while draining. ``Watch`` sends the
status at once and then each change; all callers share one readiness check per ``interval``.
Health calls need no token: orchestrators' probes do not carry one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

Readiness = Callable[[], Awaitable[list[str]]]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health(health_pb2_grpc.HealthServicer):
    """The health service, backed by the gateway's readiness (``/readyz``'s checks)."""

    def __init__(self, readiness: Readiness, interval: float = 1.0) -> None:
        self.readiness = readiness
        self.interval = interval
        self._status: int | None = None
        self._at = 0.0
        self._pending: asyncio.Future[int] | None = None
        self.changed = asyncio.Event()
        """Set to wake the watchers at once (drain)."""
        self.closing = False
        """Set on drain: watchers get their last status and their stream ends, so they do
        not hold the drain's grace period the way a call in flight does."""

    async def status(self) -> int:
        """SERVING or NOT_SERVING, from a readiness check at most ``interval`` old."""
        if self._status is not None and time.monotonic() - self._at < self.interval:
            return self._status
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._check())
            self._pending.add_done_callback(self._clear)
        return await asyncio.shield(self._pending)

    def _clear(self, _: object) -> None:
        self._pending = None

    async def _check(self) -> int:
        failing = await self.readiness()
        self._status = NOT_SERVING if failing else SERVING
        self._at = time.monotonic()
        return self._status

    def invalidate(self, closing: bool = False) -> None:
        """Forget the cached status and wake the watchers (readiness changed now)."""
        self._status = None
        self.closing = self.closing or closing
        self.changed.set()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> health_pb2.HealthCheckResponse:
        """The status now."""
        return health_pb2.HealthCheckResponse(status=await self.status())

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The status, then every change, until the caller leaves."""
        last: int | None = None
        while True:
            status = await self.status()
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            if self.closing:
                return
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), self.interval)

    async def List(self, request: Any, context: Any) -> Any:
        """The overall status under the empty service name."""
        pb2: Any = health_pb2  # List is newer than the type stubs
        response = pb2.HealthListResponse()
        response.statuses[""].status = await self.status()
        return response
