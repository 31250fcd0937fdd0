"""The counter store as the stages use it: ``state.url`` behind a circuit breaker, with the
policy's choice (``state.on_error``) applied whenever the store cannot answer.

* ``allow``: the request passes unlimited (``gateway_state_fallback_total{mode="allow"}``).
* ``deny``: :class:`StateUnavailable`; the stage answers 503 ``state_unavailable``.
* ``local``: an in-process limiter (the memory store) at ``limit // replicas`` (at least 1).

No store error reaches the client any other way.

With ``state.local_share`` a process admits requests on room the store told it about
(a *lease* per counter) and writes what they added in the background; see the field.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from gateway.pipeline import BuildContext
from gateway.policy.sections import StateConfig
from gateway.store.base import Counter, Store, StoreError, Verdict
from gateway.store.breaker import Breaker
from gateway.store.memory import MemoryStore, process_store
from gateway.telemetry import metrics

log = logging.getLogger("gateway.state")

STARTUP_TIMEOUT = 2.0
"""Seconds the first connection and ping may take (a Cluster client reads the slot map)."""
WARM_CONNECTIONS = 4
"""Connections opened at start, so the first requests do not each open one."""
SETTLE_DELAY = 0.02
"""Seconds corrections gather before they are written. Most are refunds (the reservation
counts ``max_tokens``, the answer uses fewer): a late one makes a limit briefly stricter."""
FULL_TTL = 1.0
"""Seconds a counter found with nothing left is refused locally before Redis is asked again."""
MAX_FULL_KEYS = 100_000
"""Counters remembered as full at once (a bound on memory when many clients are refused)."""
MAX_LEASES = 100_000
"""Counters with a lease at once (``state.local_share``; a bound on memory, per-IP keys)."""
MAX_BACKLOG = 100_000
"""Counters whose unwritten additions are kept for a retry after a failed write."""


class _Lease:
    """Room on one counter this process may use without asking the store."""

    __slots__ = ("expires", "left", "remaining", "reset_at")

    def __init__(self, left: int, expires: float, remaining: int, reset_at: float) -> None:
        self.left = left
        """Units this process may still add on its own."""
        self.expires = expires
        """Loop time the lease ends (``state.local_ttl`` after the store's answer)."""
        self.remaining = remaining
        """What the store said was left; reported, less what was used since."""
        self.reset_at = reset_at
        """Loop time of the reset the store reported."""


class StateUnavailable(Exception):
    """The store failed and ``state.on_error`` is ``deny``."""


class SharedState:
    """One per pipeline: the configured store, its breaker and the fallback."""

    def __init__(self, cfg: StateConfig) -> None:
        self.mode = cfg.on_error
        self.replicas = cfg.replicas
        self.prefix = cfg.key_prefix
        self.timeout = cfg.timeout
        self.retry_after = max(1, round(cfg.breaker_probe))
        self.primary: Store
        self.breaker: Breaker | None = None
        self.local: MemoryStore | None = None
        if cfg.url.startswith("memory://"):
            self.primary = process_store("memory")
        else:
            from gateway.store.redis import RedisStore  # the only import of redis-py

            password = cfg.password.resolve().decode() if cfg.password else None
            self.primary = RedisStore(cfg.url, cfg.timeout, password)
            self.breaker = Breaker(self.primary.ping, cfg.breaker_failures, cfg.breaker_probe)
            if self.mode == "local":
                self.local = process_store("local")
        self._fallback = metrics.STATE_FALLBACK.labels(self.mode)
        self._errors = {op: metrics.STATE_ERRORS.labels(op) for op in ("hit", "settle", "ping")}
        self._pending: set[asyncio.Task[None]] = set()
        self._writer: asyncio.Task[None] | None = None
        #: Corrections waiting for the next write, merged per counter.
        self._backlog: dict[tuple[str, int, bool], Counter] = {}
        #: Keys with nothing left: (loop time the record expires, loop time one unit fits).
        self._full: dict[str, tuple[float, float]] = {}
        self._full_hit = metrics.CACHE_REQUESTS.labels("over_limit", "hit")
        self.share = cfg.local_share if self.breaker is not None else 0.0
        self.lease_ttl = cfg.local_ttl
        self._leases: dict[str, _Lease] = {}
        self._local_admissions = metrics.STATE_LOCAL

    @classmethod
    def of(cls, build: BuildContext) -> SharedState:
        """The pipeline's one instance, created and hooked up (start, close, readiness) on
        first use, so routes share one connection pool."""
        state = build.shared.get("state")
        if state is None:
            state = build.shared["state"] = cls(build.policy.state)
            build.on_start.append(state.start)
            build.on_close.append(state.close)
            if state.shared:
                build.readiness["state"] = state.readiness
        assert isinstance(state, SharedState)
        return state

    @property
    def shared(self) -> bool:
        """True when the store is not the in-process one."""
        return self.breaker is not None

    async def start(self) -> None:
        """Connect and ping once (allowing ``STARTUP_TIMEOUT``), so a store that is down at
        start opens the breaker before any request and one that is up has a warm pool."""
        metrics.STATE_DEGRADED.set(0)
        if self.breaker is None:
            return
        try:
            await asyncio.gather(*(self._warm() for _ in range(WARM_CONNECTIONS)))
        except StoreError as exc:
            self._errors["ping"].inc()
            self.breaker.trip(str(exc))

    async def _warm(self) -> None:
        await self.primary.ping(max(STARTUP_TIMEOUT, self.timeout))

    async def hit(self, counters: Sequence[Counter]) -> Verdict | None:
        """The verdict for a batch; None means "passed unlimited" (store down, ``allow``)."""
        breaker = self.breaker
        if breaker is None:
            assert isinstance(self.primary, MemoryStore)
            return self.primary.hit_now(counters)
        if self._full:
            cached = self._cached_refusal(counters)
            if cached is not None:
                return cached
        if not breaker.open:
            if self._leases:
                leased = self._leased(counters)
                if leased is not None:
                    return leased
            try:
                if self.share and self._backlog:
                    await self._write_first(counters)
                verdict = await self.primary.hit(counters)
            except StoreError as exc:
                self._errors["hit"].inc()
                breaker.failure(str(exc))
            else:
                breaker.success()
                if verdict.allowed:
                    if self.share:
                        self._lease(counters, verdict)
                elif verdict.remaining[verdict.failed] == 0:
                    self._remember_full(
                        counters[verdict.failed].key, verdict.reset_ms[verdict.failed]
                    )
                return verdict
        self._fallback.inc()
        if self.local is None:
            if self.mode == "deny":
                raise StateUnavailable
            return None
        verdict = self.local.hit_now([self._scaled(c) for c in counters])
        verdict.local = True
        return verdict

    def _lease(self, counters: Sequence[Counter], verdict: Verdict) -> None:
        """Take ``local_share`` of the room the store just reported on each counter."""
        leases = self._leases
        if len(leases) >= MAX_LEASES:
            leases.clear()
        now = asyncio.get_running_loop().time()
        expires = now + self.lease_ttl
        backlog = self._backlog
        for i, c in enumerate(counters):
            # What this process added but has not written yet is not in the store's answer.
            unwritten = backlog.get((c.key, c.period_ms, c.fixed))
            remaining = verdict.remaining[i] - (max(0, unwritten.amount) if unwritten else 0)
            left = int(remaining * self.share)
            if left > 0:
                reset_at = now + verdict.reset_ms[i] / 1000
                leases[c.key] = _Lease(left, expires, remaining, reset_at)
            else:
                leases.pop(c.key, None)

    async def _write_first(self, counters: Sequence[Counter]) -> None:
        """Write this process's unwritten additions to the batch's counters before the store
        decides on it, so that its answer counts them (a lease used up, then refused)."""
        backlog = self._backlog
        early: list[Counter] = []
        for c in counters:
            unwritten = backlog.pop((c.key, c.period_ms, c.fixed), None)
            if unwritten is not None and unwritten.amount:
                early.append(unwritten)
        if not early:
            return
        try:
            await self.primary.add(early)
        except StoreError:
            self._merge(early)
            raise

    def _leased(self, counters: Sequence[Counter]) -> Verdict | None:
        """Admit the batch on its leases, or None when one is missing, over or too small."""
        now = asyncio.get_running_loop().time()
        leases = self._leases
        held: list[_Lease] = []
        for c in counters:
            lease = leases.get(c.key)
            if lease is None or lease.expires <= now or lease.left < c.amount:
                return None
            if lease in held:
                return None  # one key twice in a batch: the store decides
            held.append(lease)
        remaining, reset = [], []
        for c, lease in zip(counters, held, strict=True):
            lease.left -= c.amount
            lease.remaining -= c.amount
            remaining.append(max(0, lease.remaining))
            reset.append(max(0, round((lease.reset_at - now) * 1000)))
        self._local_admissions.inc()
        self._queue([c for c in counters if c.amount])
        return Verdict(True, -1, remaining, reset)

    def _remember_full(self, key: str, reset_ms: int) -> None:
        # Nothing fits in this counter for reset_ms: its requests are refused here without a
        # round trip, for at most FULL_TTL, so that a flood from one client costs Redis one
        # call a second and an outage is still noticed within a second.
        if len(self._full) >= MAX_FULL_KEYS:
            self._full.clear()
        now = asyncio.get_running_loop().time()
        fits = now + reset_ms / 1000
        self._full[key] = (min(fits, now + FULL_TTL), fits)

    def _cached_refusal(self, counters: Sequence[Counter]) -> Verdict | None:
        now = asyncio.get_running_loop().time()
        for i, c in enumerate(counters):
            record = self._full.get(c.key)
            if record is None:
                continue
            if record[0] <= now:
                del self._full[c.key]
                continue
            if c.amount > 0:
                self._full_hit.inc()
                n = len(counters)
                reset = [0] * n
                reset[i] = max(1, round((record[1] - now) * 1000))
                return Verdict(False, i, [0] * n, reset)
        return None

    def _scaled(self, c: Counter) -> Counter:
        limit = max(1, c.limit // self.replicas)
        return Counter(c.key, limit, c.period_ms, min(c.amount, limit), c.fixed)

    def settle(self, counters: Sequence[Counter], local: bool) -> None:
        """Add corrections (real usage minus the reservation) without making anyone wait."""
        if not counters:
            return
        if local or self.breaker is None:
            store = self.local if local and self.local is not None else self.primary
            if isinstance(store, MemoryStore):
                store.add_now(counters)
            return
        if self.breaker.open:
            self._errors["settle"].inc()  # the reservation stays: an over-count, never under
            return
        self._queue(counters)

    def _queue(self, counters: Sequence[Counter]) -> None:
        # Additions are merged and written by one task, one batch per SETTLE_DELAY: under
        # load one script call carries many requests' corrections (at 1,000 req/s, some 20)
        # and leased admissions instead of each costing Redis a call of its own.
        self._merge(counters)
        # done(), not membership of _pending: a writer that just saw an empty backlog has
        # returned but is only removed from _pending a loop turn later
        if self._writer is None or self._writer.done():
            self._writer = task = asyncio.get_running_loop().create_task(self._flush())
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _flush(self) -> None:
        assert self.breaker is not None
        while True:
            # Wait before every batch, not only the first: what arrives while one is written
            # joins the next, rather than making one call per round trip under load.
            await asyncio.sleep(SETTLE_DELAY)
            batch = [c for c in self._backlog.values() if c.amount]
            self._backlog = {}
            if not batch:
                return
            failure = "open" if self.breaker.open else None
            if failure is None:
                try:
                    await self.primary.add(batch)
                except StoreError as exc:
                    failure = str(exc)
                    self.breaker.failure(failure)
                else:
                    self.breaker.success()
                    continue
            # Kept for the next write, not dropped: they may be admissions made on a lease,
            # which the store must see (the bound keeps memory in check through an outage).
            self._errors["settle"].inc()
            if len(self._backlog) + len(batch) <= MAX_BACKLOG:
                self._merge(batch)
            return

    def _merge(self, counters: Sequence[Counter]) -> None:
        """Add to the unwritten backlog, one entry per counter."""
        backlog = self._backlog
        for c in counters:
            k = (c.key, c.period_ms, c.fixed)
            prev = backlog.get(k)
            # the constructor, not _replace (~2x its cost): this runs for each correction
            backlog[k] = (
                c
                if prev is None
                else Counter(
                    prev.key, prev.limit, prev.period_ms, prev.amount + c.amount, prev.fixed
                )
            )

    async def drain(self) -> None:
        """Wait for settlements still on their way (tests, shutdown), and write once more
        what an earlier failure left (when the store is back)."""
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        if self._backlog and self.breaker is not None and not self.breaker.open:
            await self._flush()

    async def readiness(self) -> str | None:
        """Unready only when requests depend on the store (``on_error: deny``) and it is down;
        with ``allow`` or ``local`` the gateway keeps serving, and the gauge says it."""
        if self.breaker is None or self.mode != "deny":
            return None
        if self.breaker.open:
            return "state store unreachable"
        try:
            await self.primary.ping()
        except StoreError:
            self._errors["ping"].inc()
            return "state store unreachable"
        return None

    async def close(self) -> None:
        """Let pending settlements finish (each is bounded by the store timeout), then close."""
        with contextlib.suppress(Exception):
            await self.drain()
        if self.breaker is not None:
            await self.breaker.close()
        await self.primary.close()
