"""The Redis store: redis://, rediss://, redis+sentinel:// and redis+cluster://.

Every batch is decided by one ``EVALSHA`` of :data:`gateway.store.script.LIMIT_SCRIPT` under
one overall timeout (``state.timeout``), with no retries: the circuit breaker, not a retry loop,
handles an outage. Every client error becomes a :class:`StoreError`. With the lean client, the
batches of one event-loop turn share that call (each decided as if alone, in order): under
load that is several requests a call, and Redis' CPU a request falls with it.

Clients: :mod:`gateway.store.resp` (lean, one pipelined connection) for a single Redis and for
the master found through Sentinel (redis-py asks the sentinels); redis-py for Cluster, which
routes by slot. This is the only module that imports redis-py.

Cluster: a script may only touch keys of one hash slot. The keys of one identity share a
hash tag (``{u:alice}``, ``{ip:…}``, ``{r:chat}``), so a request touches at most three slots;
each slot gets its script call, all in parallel (one round-trip time). When one slot refuses,
the counts just made on the others are taken back with a second call (only on refusals).
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.crc import key_slot

from gateway.store.base import Counter, StoreError, Verdict
from gateway.store.resp import LeanRedis
from gateway.store.script import LIMIT_SCRIPT

Client = Redis | RedisCluster


def _hosts(netloc: str, default_port: int) -> list[tuple[str, int]]:
    out = []
    for part in netloc.rpartition("@")[2].split(","):
        host, port = part, ""
        if part.rfind(":") > part.rfind("]"):
            host, _, port = part.rpartition(":")
        out.append((host.strip("[]") or "127.0.0.1", int(port or default_port)))
    return out


def _common(timeout: float, password: str | None) -> dict[str, Any]:
    # No socket_timeout: every call runs under one asyncio.timeout already, and redis-py's
    # own would add a task and a timer per command.
    return {
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "password": password,
    }


#: Query options of redis:// and rediss:// URLs that the lean client understands.
_LEAN_QUERY = frozenset({"ssl_ca_certs"})


def _tls_context(cafile: str | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)


def lean_client(url: str, timeout: float, password: str | None) -> tuple[LeanRedis, Any] | None:
    """The lean client for a single Redis or a Sentinel-managed master, with the Sentinel
    object to close with it; None when the URL needs redis-py (Cluster, other options)."""
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if parts.scheme in ("redis", "rediss"):
        if set(query) - _LEAN_QUERY:
            return None
        host, port = _hosts(parts.netloc, 6379)[0]
        db = parts.path.strip("/")
        tls = _tls_context(query.get("ssl_ca_certs")) if parts.scheme == "rediss" else None

        async def fixed() -> tuple[str, int]:
            return host, port

        client = LeanRedis(
            fixed,
            username=unquote(parts.username) if parts.username else None,
            password=password,
            db=int(db) if db else 0,
            tls=tls,
            connect_timeout=timeout,
        )
        return client, None
    if parts.scheme == "redis+sentinel":
        segments = [unquote(p) for p in parts.path.split("/") if p]
        if not segments:
            raise ValueError("redis+sentinel:// needs the service name: //HOST:PORT/mymaster")
        use_tls = query.get("ssl") in ("1", "true", "yes")
        tls_kw: dict[str, Any] = {}
        if use_tls:
            tls_kw = {"ssl": True, "ssl_ca_certs": query.get("ssl_ca_certs")}
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            _hosts(parts.netloc, 26379),
            sentinel_kwargs={**_common(timeout, None), **tls_kw},
        )
        service = segments[0]

        async def master() -> tuple[str, int]:
            host, port = await sentinel.discover_master(service)
            return str(host), int(port)

        client = LeanRedis(
            master,
            password=password,
            db=int(segments[1]) if len(segments) > 1 else 0,
            tls=_tls_context(query.get("ssl_ca_certs")) if use_tls else None,
            connect_timeout=timeout,
        )
        return client, sentinel
    return None


def connect(url: str, timeout: float, password: str | None = None) -> tuple[Client, Any]:
    """A redis-py client for ``url`` (no I/O yet) and the extra object to close with it."""
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    common = _common(timeout, password)
    tls: dict[str, Any] = {}
    if query.get("ssl") in ("1", "true", "yes"):
        tls = {"ssl": True, "ssl_ca_certs": query.get("ssl_ca_certs")}
    if parts.scheme in ("redis", "rediss"):
        # from_url reads db, username, TLS options; a password in the URL is refused by the schema
        return Redis.from_url(url, **common), None
    if parts.scheme == "redis+cluster":
        nodes = [ClusterNode(h, p) for h, p in _hosts(parts.netloc, 6379)]
        return RedisCluster(startup_nodes=nodes, **common, **tls), None
    raise ValueError(f"unsupported state url scheme {parts.scheme!r}")


def script_args(
    mode: str, groups: Sequence[Sequence[Counter]], now: int | None
) -> tuple[list[str], list[Any]]:
    """The script's ``KEYS`` and ``ARGV`` for these groups (layout: :mod:`gateway.store.script`).

    A counter the call already holds (same key and window) is sent once, as a slot the
    groups refer to: under load a call's requests mostly share their ip and user keys, and
    every argument is a string Redis makes and the script converts."""
    if mode == "hit" and len(groups) == 1:
        lone = groups[0]
        keys = [c[0] for c in lone]
        if len(set(keys)) == len(keys):
            # One request, a key per counter (the common case, and every request at a low
            # rate): the script's lean path, without slots or refunds.
            args: list[Any] = ["one", "" if now is None else now, len(lone)]
            for _, limit, period, amount, fixed in lone:
                if amount < 0:
                    break
                args += (limit, -period if fixed else period, amount)
            else:
                return keys, args
    keys = []
    specs: list[Any] = []
    sizes: list[int] = []
    pairs: list[Any] = []
    slots: dict[str, tuple[int, int, int, bool]] = {}
    for counters in groups:
        sizes.append(len(counters))
        for key, limit, period, amount, fixed in counters:
            slot = slots.get(key)
            if slot is None or slot[1] != limit or slot[2] != period or slot[3] != fixed:
                keys.append(key)
                specs += (limit, -period if fixed else period)
                slot = slots[key] = (len(keys), limit, period, fixed)
            pairs += (slot[0], amount)
    head = [mode, "" if now is None else now, len(keys), len(groups)]
    return keys, head + specs + sizes + pairs


#: Requests one script call decides at most; the rest of a loop turn's go in the next call
#: (pipelined on the same write). Bounds how long one call holds Redis' single thread.
MAX_GROUPS = 32


class _Call:
    """The batches one script call will decide, its opener's first."""

    __slots__ = ("groups", "sealed", "waiters")

    def __init__(self, counters: Sequence[Counter]) -> None:
        self.groups: list[Sequence[Counter]] = [counters]
        self.waiters: list[asyncio.Future[Verdict] | None] = [None]
        self.sealed = False
        """Written out: later batches open a new call."""


class RedisStore:
    """Counters in Redis (see :mod:`gateway.store.base` for the algorithm)."""

    def __init__(
        self, url: str, timeout: float, password: str | None = None, now: int | None = None
    ) -> None:
        self.url = url
        self.timeout = timeout
        lean = lean_client(url, timeout, password)
        self.lean: LeanRedis | None = None
        self.client: Client | None = None
        if lean is not None:
            self.lean, self._extra = lean
        else:
            self.client, self._extra = connect(url, timeout, password)
            self._script = cast(Redis, self.client).register_script(LIMIT_SCRIPT)
        self.cluster = isinstance(self.client, RedisCluster)
        self._sha = hashlib.sha1(LIMIT_SCRIPT.encode()).hexdigest()
        self.now = now
        """Fixed script time in ms, for tests; None uses Redis' clock."""
        self._open: _Call | None = None
        """The script call that the next batches of this loop turn join."""

    async def _eval(
        self, mode: str, groups: Sequence[Sequence[Counter]], deadline: float | None = None
    ) -> list[int]:
        keys, argv = script_args(mode, groups, self.now)
        if self.lean is not None:
            reply = await self.lean.evalsha(self._sha, LIMIT_SCRIPT, keys, argv, deadline)
        else:
            reply = await self._script(keys=keys, args=argv)
        return list(reply) if isinstance(reply, list) else [int(reply)]

    async def _run(
        self, mode: str, calls: Sequence[Sequence[Sequence[Counter]]]
    ) -> list[list[int]]:
        """The script once per call (per hash slot), in parallel, under the timeout."""
        try:
            if self.lean is not None and len(calls) == 1:
                # the lean client keeps the deadline itself (cheaper than asyncio.timeout)
                deadline = asyncio.get_running_loop().time() + self.timeout
                return [await self._eval(mode, calls[0], deadline)]
            async with asyncio.timeout(self.timeout):
                if len(calls) == 1:
                    return [await self._eval(mode, calls[0])]
                return list(await asyncio.gather(*(self._eval(mode, g) for g in calls)))
        except Exception as exc:  # any client error: the stage applies state.on_error
            raise _store_error(exc) from None

    async def _coalesced(self, counters: Sequence[Counter]) -> Verdict:
        """Decide this batch in one script call with the other batches of this loop turn.

        The first batch of a turn opens a call; the next ones join it until the lean client
        writes it out with the turn's other commands (so nobody waits longer than alone),
        or until it holds :data:`MAX_GROUPS`. Each is decided as if alone, in the order they
        came (see the script); the opener hands each its verdict."""
        assert self.lean is not None
        loop = asyncio.get_running_loop()
        call = self._open
        if call is not None and not call.sealed and len(call.groups) < MAX_GROUPS:
            waiter: asyncio.Future[Verdict] = loop.create_future()
            call.groups.append(counters)
            call.waiters.append(waiter)
            return await waiter
        call = self._open = _Call(counters)
        now = self.now

        def build() -> tuple[list[str], list[Any]]:
            call.sealed = True
            groups = call.groups
            return script_args("hit", groups, now)

        try:
            try:
                deadline = loop.time() + self.timeout
                reply = await self.lean.evalsha_built(self._sha, LIMIT_SCRIPT, build, deadline)
            except Exception as exc:
                raise _store_error(exc) from None
        except BaseException as exc:
            # The others fail with the opener (a store error, or its task cancelled): none
            # is left waiting.
            why = str(exc) if isinstance(exc, StoreError) else "cancelled"
            for other in call.waiters[1:]:
                if other is not None and not other.done():
                    other.set_exception(StoreError(why))
            raise
        finally:
            if self._open is call:
                self._open = None
        pos, mine = 0, None
        for group, joined in zip(call.groups, call.waiters, strict=True):
            end = pos + 2 + 2 * len(group)
            verdict = _verdict(reply[pos:end])
            pos = end
            if joined is None:
                mine = verdict
            elif not joined.done():
                joined.set_result(verdict)
        assert mine is not None
        return mine

    async def hit(self, counters: Sequence[Counter]) -> Verdict:
        """Admit the batch when every counter has room; one round trip."""
        if self.lean is not None:
            return await self._coalesced(counters)
        if not self.cluster:
            return _verdict((await self._run("hit", [[counters]]))[0])
        slots = _by_slot(counters)
        replies = await self._run("hit", [[group] for _, group in slots])
        n = len(counters)
        remaining, reset = [0] * n, [0] * n
        refused: list[int] = []
        admitted: list[Counter] = []
        for (idx, group), reply in zip(slots, replies, strict=True):
            part = _verdict(reply)
            for j, i in enumerate(idx):
                remaining[i], reset[i] = part.remaining[j], part.reset_ms[j]
            if part.allowed:
                admitted += group
            else:
                refused.append(idx[part.failed])
        if not refused:
            return Verdict(True, -1, remaining, reset)
        # Another slot refused: take back what the admitting slots just counted.
        taken: dict[str, int] = {}
        for c in admitted:
            taken[c.key] = taken.get(c.key, 0) + c.amount
        if taken:
            await self.add([_negated(c) for c in admitted])
        for i, c in enumerate(counters):
            if c.key in taken:
                remaining[i] = min(c.limit, remaining[i] + taken[c.key])
        return Verdict(False, min(refused), remaining, reset)

    async def add(self, counters: Sequence[Counter]) -> None:
        """Add every amount unconditionally (settling; negative amounts refund)."""
        groups = [g for _, g in _by_slot(counters)] if self.cluster else [counters]
        await self._run("add", [[g] for g in groups])

    async def ping(self, within: float | None = None) -> None:
        """Raise :class:`StoreError` when Redis does not answer within the timeout (a longer
        one at start-up, when a Cluster client first reads the slot map)."""
        try:
            async with asyncio.timeout(within or self.timeout):
                if self.lean is not None:
                    await self.lean.ping()
                else:
                    assert self.client is not None
                    await self.client.ping()
        except Exception as exc:
            raise _store_error(exc) from None

    async def close(self) -> None:
        """Close the connections (and the sentinels' connections)."""
        if self.lean is not None:
            await self.lean.aclose()
        if self.client is not None:
            await self.client.aclose()
        if isinstance(self._extra, Sentinel):
            for s in self._extra.sentinels:
                await s.aclose()


def _store_error(exc: Exception) -> StoreError:
    """What a client error is called in metrics and logs (never the client's own text)."""
    return StoreError("timeout" if isinstance(exc, TimeoutError) else type(exc).__name__)


def _verdict(reply: list[int]) -> Verdict:
    rest = [int(x) for x in reply[2:]]
    return Verdict(int(reply[0]) == 1, int(reply[1]) - 1, rest[0::2], rest[1::2])


def _negated(c: Counter) -> Counter:
    return Counter(c.key, c.limit, c.period_ms, -c.amount, c.fixed)


def _by_slot(counters: Sequence[Counter]) -> list[tuple[list[int], list[Counter]]]:
    slots: dict[int, tuple[list[int], list[Counter]]] = {}
    for i, c in enumerate(counters):
        idx, group = slots.setdefault(key_slot(c.key.encode()), ([], []))
        idx.append(i)
        group.append(c)
    return list(slots.values())
