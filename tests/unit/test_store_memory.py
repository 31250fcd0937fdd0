"""The in-process store: the ``limits`` algorithm, batches, waits, fixed windows, sweeping."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from gateway.store.base import Counter, wait_ms
from gateway.store.memory import MemoryStore

T0 = 1_800_000_000_000  # ms, a multiple of every period used here
DAY = 86_400_000


def test_same_decisions_as_the_limits_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reference check: MemoryStore admits exactly what limits' SlidingWindowCounter admits."""
    rnd = random.Random(7)
    clock = {"now": T0 + 3}
    monkeypatch.setattr(time, "time", lambda: clock["now"] / 1000)
    item = RateLimitItemPerSecond(7, 2)  # 7 per 2 seconds
    ours = MemoryStore(clock=lambda: clock["now"])

    async def run() -> list[tuple[bool, bool]]:
        ref = SlidingWindowCounterRateLimiter(MemoryStorage())
        out = []
        for _ in range(1500):
            # odd ms steps keep the reference's float arithmetic off exact integers
            clock["now"] += rnd.choice([1, 3, 37, 151, 701, 1999])
            cost = rnd.choice([1, 1, 1, 2, 3])
            theirs = await ref.hit(item, "k", cost=cost)
            mine = ours.hit_now([Counter("k", 7, 2000, cost)]).allowed
            out.append((theirs, mine))
        return out

    decisions = asyncio.run(run())
    assert sum(t for t, _ in decisions) > 300  # the sequence exercises both outcomes
    assert [t for t, _ in decisions] == [m for _, m in decisions]


def test_batch_is_all_or_nothing() -> None:
    store = MemoryStore()
    roomy, full = Counter("a", 5, 1000), Counter("b", 1, 1000)
    assert store.hit_now([roomy, full], T0).allowed
    v = store.hit_now([roomy, full], T0 + 1)
    assert not v.allowed and v.failed == 1
    assert v.remaining == [4, 0]  # the refused request cost nothing in the roomy scope
    assert store.hit_now([roomy], T0 + 2).remaining == [3]


def test_remaining_and_reset_follow_the_window() -> None:
    store = MemoryStore()
    c = Counter("k", 3, 60_000)
    seen = [store.hit_now([c], T0 + 10_000) for _ in range(3)]
    assert [v.remaining[0] for v in seen] == [2, 1, 0]
    assert seen[0].reset_ms == [50_000]  # room left: the end of the current window
    # none left: the exact wait until one fits; the next window still carries the weight of
    # 3 previous hits, so one fits once floor(3 * (60000 - e) / 60000) <= 2, at e > 0.
    assert seen[2].reset_ms == [50_001]
    denied = store.hit_now([c], T0 + 10_000)
    assert not denied.allowed and denied.reset_ms == [50_001]
    assert not store.hit_now([c], T0 + 60_000).allowed
    assert store.hit_now([c], T0 + 60_001).allowed


def test_wait_matches_a_simulation() -> None:
    rnd = random.Random(3)
    for _ in range(400):
        period = rnd.choice([50, 97, 200])
        limit = rnd.randint(1, 12)
        prev, cur = rnd.randint(0, 15), rnd.randint(0, 15)
        elapsed = rnd.randrange(period)
        amount = rnd.randint(1, limit)
        expected = _simulate(limit, period, elapsed, cur, prev, amount)
        assert wait_ms(limit, period, elapsed, cur, prev, amount) == expected


def _simulate(limit: int, period: int, elapsed: int, cur: int, prev: int, amount: int) -> int:
    for waited in range(3 * period):
        e, p, c = elapsed + waited, prev, cur
        if e >= period:  # the next window: today's count becomes the previous one
            e, p, c = e - period, cur, 0
        if e >= period:
            e, p, c = e - period, 0, 0
        if p * (period - e) // period + c + amount <= limit:
            return waited
    raise AssertionError("never fits")


def test_fixed_window_resets_at_utc_midnight() -> None:
    store = MemoryStore()
    midnight = (T0 // DAY + 1) * DAY
    budget = Counter("b", 100, DAY, 60, fixed=True)
    assert store.hit_now([budget], midnight - 5000).allowed
    v = store.hit_now([budget], midnight - 4000)
    assert not v.allowed and v.reset_ms == [4000]
    assert v.remaining == [40]
    v = store.hit_now([budget], midnight)  # a new UTC day: nothing carried over
    assert v.allowed and v.remaining == [40]


def test_add_settles_and_refunds() -> None:
    store = MemoryStore()
    tokens = Counter("t", 1000, 60_000, 800)
    assert store.hit_now([tokens], T0).allowed
    store.add_now([Counter("t", 1000, 60_000, -700)], T0 + 1)  # real usage was 100
    assert store.hit_now([Counter("t", 1000, 60_000, 900)], T0 + 2).allowed
    store.add_now([Counter("t", 1000, 60_000, -5000)], T0 + 3)  # never below zero
    assert store.hit_now([Counter("t", 1000, 60_000, 0)], T0 + 4).remaining == [1000]
    # a refund after the window rolled comes off the previous window's count
    assert store.hit_now([Counter("u", 10, 1000, 10)], T0).allowed
    store.add_now([Counter("u", 10, 1000, -10)], T0 + 1500)
    assert store.hit_now([Counter("u", 10, 1000, 10)], T0 + 1501).allowed


def test_old_windows_are_swept() -> None:
    store = MemoryStore()
    for i in range(100):
        store.hit_now([Counter(f"ip{i}", 5, 1000)], T0)
    assert len(store) == 100
    for i in range(20):
        store.hit_now([Counter(f"new{i}", 5, 1000)], T0 + 5000)
    assert len(store) < 100  # each new or rolled key drops up to 8 stale ones at the front
    for i in range(20, 40):
        store.hit_now([Counter(f"new{i}", 5, 1000)], T0 + 5000)
    assert len(store) == 40
