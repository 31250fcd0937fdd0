"""A circuit breaker in front of the counter store.

Closed: operations go to the store; ``failures`` consecutive errors open it. Open: nobody
waits on the store (the stage applies ``state.on_error`` at once) while one background task
pings it every ``probe`` seconds; the first answer closes the breaker again. So an outage
costs at most ``failures`` timed-out operations per opening, and recovery needs no request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from gateway.telemetry import metrics

log = logging.getLogger("gateway.state")

Ping = Callable[[], Awaitable[None]]


class Breaker:
    """Counts consecutive failures; open means "do not call the store"."""

    def __init__(self, ping: Ping, failures: int = 3, probe: float = 1.0) -> None:
        self.ping = ping
        self.failures = failures
        self.probe = probe
        self.open = False
        self._streak = 0
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def success(self) -> None:
        """An operation worked."""
        self._streak = 0

    def failure(self, why: str) -> None:
        """An operation failed; open after ``failures`` in a row."""
        self._streak += 1
        if not self.open and self._streak >= self.failures:
            self.trip(why)

    def trip(self, why: str) -> None:
        """Open now and start probing in the background."""
        if self.open or self._closed:
            return
        self.open = True
        metrics.STATE_DEGRADED.set(1)
        log.warning("state store unavailable; limits follow state.on_error", extra={"why": why})
        self._task = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(self.probe)
            try:
                await self.ping()
            except Exception:
                metrics.STATE_ERRORS.labels("ping").inc()
                continue
            self.open = False
            self._streak = 0
            metrics.STATE_DEGRADED.set(0)
            log.info("state store reachable again; shared limits resumed")
            return

    async def close(self) -> None:
        """Stop probing (the pipeline is being retired)."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
