"""``state.local_share``: admissions on leased room, against an injected in-memory store."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import pytest

from gateway.policy.sections import StateConfig
from gateway.store import Counter, SharedState, StoreError, Verdict
from gateway.store.breaker import Breaker
from gateway.store.memory import MemoryStore

T0 = 1_800_000_000_000


class SharedMemory:
    """The memory store behind an await (as Redis is), counting calls; fails when ``down``."""

    def __init__(self) -> None:
        self.mem = MemoryStore(clock=lambda: T0)
        self.hits = 0
        self.adds = 0
        self.down = False

    async def hit(self, counters: Sequence[Counter]) -> Verdict:
        await asyncio.sleep(0)  # other requests run while this one waits
        if self.down:
            raise StoreError("timeout")
        self.hits += 1
        return self.mem.hit_now(counters)

    async def add(self, counters: Sequence[Counter]) -> None:
        await asyncio.sleep(0)
        if self.down:
            raise StoreError("timeout")
        self.adds += 1
        self.mem.add_now(counters)

    async def ping(self, within: float | None = None) -> None:
        if self.down:
            raise StoreError("refused")

    async def close(self) -> None:
        pass

    def count(self, c: Counter) -> int:
        """What the store holds on ``c`` (its remaining room taken from its limit)."""
        probe = Counter(c.key, c.limit, c.period_ms, 0, c.fixed)
        return c.limit - self.mem.hit_now([probe]).remaining[0]


def _state(store: SharedMemory, share: float, ttl: str = "10s") -> SharedState:
    cfg = StateConfig.model_validate(
        {"url": "redis://127.0.0.1:1", "local_share": share, "local_ttl": ttl,
         "breaker_failures": 50, "key_prefix": "lease"}
    )  # fmt: skip
    state = SharedState(cfg)
    state.primary = store
    state.breaker = Breaker(store.ping, failures=50, probe=0.01)
    return state


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5])
def test_one_process_never_exceeds_a_limit_nor_refuses_early(share: float) -> None:
    async def run() -> None:
        store = SharedMemory()
        state = _state(store, share)
        rnd = random.Random(share)
        admitted = 0
        refused_at: list[int] = []

        async def one(amount: int) -> None:
            nonlocal admitted
            verdict = await state.hit([Counter("k", 100, 60_000, amount, True)])
            assert verdict is not None
            if verdict.allowed:
                admitted += amount
            else:
                refused_at.append(admitted + amount)  # what it would have made

        for _ in range(60):
            await asyncio.gather(*(one(rnd.randint(1, 3)) for _ in range(rnd.randint(1, 8))))
        await state.drain()
        assert admitted <= 100
        # a refusal means even the store, which has every admission, had no room for it
        assert refused_at and min(refused_at) > 100 - 3
        assert store.count(Counter("k", 100, 60_000, 1, True)) == admitted
        assert store.hits < 60  # about 240 requests

    asyncio.run(run())


def test_a_refund_still_reaches_the_store_with_leased_additions() -> None:
    async def run() -> None:
        store = SharedMemory()
        state = _state(store, 0.5)
        tokens = Counter("t", 10_000, 60_000, 500, True)
        for _ in range(6):
            verdict = await state.hit([tokens])
            assert verdict is not None and verdict.allowed
            state.settle([tokens._replace(amount=-450)], local=False)  # used 50 of 500
        await state.drain()
        assert store.count(tokens) == 6 * 50
        assert store.hits < 6

    asyncio.run(run())


def test_a_lease_ends_with_its_ttl_and_a_key_twice_asks_the_store() -> None:
    async def run() -> None:
        store = SharedMemory()
        state = _state(store, 0.5, ttl="50ms")
        c = Counter("k", 1000, 60_000, 1, True)
        await state.hit([c])
        await state.hit([c])
        assert store.hits == 1  # the second was leased
        await state.hit([c, c])
        assert store.hits == 2  # one key twice: the store decides
        await asyncio.sleep(0.06)
        await state.hit([c])
        assert store.hits == 3  # the lease had ended
        await state.drain()
        assert store.count(c) == 5

    asyncio.run(run())


def test_additions_a_failed_write_left_are_written_later() -> None:
    async def run() -> None:
        store = SharedMemory()
        state = _state(store, 0.5)
        c = Counter("k", 1000, 60_000, 1, True)
        for _ in range(10):
            await state.hit([c])
        store.down = True
        await asyncio.sleep(0.05)  # the background write fails; its additions are kept
        assert store.count(c) == 1
        store.down = False
        await state.drain()
        assert store.count(c) == 10

    asyncio.run(run())
