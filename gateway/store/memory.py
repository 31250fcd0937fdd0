"""The in-process store (``memory://``): one process, no I/O, the algorithm of ``base``.

A batch runs without an ``await`` in between, so it is atomic on the event loop. Counters live
in one insertion-ordered table per period; a counter moves to the end when its window rolls,
so the oldest windows are at the front and are dropped there, amortised O(1) per hit.
The process keeps one instance for ``memory://`` and one for the ``on_error: local``
fallback, so a policy reload does not hand every client a fresh quota.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from gateway.store.base import Counter, Verdict, fixed_wait_ms, wait_ms

Clock = Callable[[], int]
"""Milliseconds since the Unix epoch."""


def wall_ms() -> int:
    """The wall clock in ms (windows are aligned to it, so daily budgets roll at 00:00 UTC)."""
    return time.time_ns() // 1_000_000


class MemoryStore:
    """Sliding window counters in dictionaries (see :mod:`gateway.store.base`)."""

    def __init__(self, clock: Clock = wall_ms) -> None:
        self.clock = clock
        # period -> key -> [window index, current count, previous count]
        self._tables: dict[int, dict[str, list[int]]] = {}

    def __len__(self) -> int:
        return sum(len(t) for t in self._tables.values())

    def _slot(self, c: Counter, now: int) -> tuple[list[int], int]:
        """The counter's live state, rolled to the current window, and ms into it."""
        period = c.period_ms
        window, elapsed = divmod(now, period)
        table = self._tables.get(period)
        if table is None:
            table = self._tables[period] = {}
        state = table.get(c.key)
        if state is None:
            state = table[c.key] = [window, 0, 0]
            self._sweep(table, window)
        elif state[0] != window:
            prev = state[1] if state[0] == window - 1 and not c.fixed else 0
            state[0], state[1], state[2] = window, 0, prev
            del table[c.key]  # re-insert at the end: the table stays ordered by window
            table[c.key] = state
            self._sweep(table, window)
        return state, elapsed

    @staticmethod
    def _sweep(table: dict[str, list[int]], window: int) -> None:
        stale: list[str] = []
        for key, state in table.items():
            if state[0] >= window - 1 or len(stale) == 8:
                break
            stale.append(key)
        for key in stale:
            del table[key]

    def hit_now(self, counters: Sequence[Counter], now: int | None = None) -> Verdict:
        """:meth:`hit` without the coroutine (the batch is atomic either way)."""
        now = self.clock() if now is None else now
        slots = [self._slot(c, now) for c in counters]
        failed = -1
        for i, c in enumerate(counters):
            state, elapsed = slots[i]
            if _weighted(c, state, elapsed) + c.amount > c.limit:
                failed = i
                break
        if failed < 0:
            for i, c in enumerate(counters):
                slots[i][0][1] += c.amount
        remaining: list[int] = []
        reset: list[int] = []
        for i, c in enumerate(counters):
            state, elapsed = slots[i]
            left = c.limit - _weighted(c, state, elapsed)
            remaining.append(left if left > 0 else 0)
            reset.append(_reset(c, state, elapsed, left, c.amount if i == failed else 1))
        return Verdict(failed < 0, failed, remaining, reset)

    async def hit(self, counters: Sequence[Counter]) -> Verdict:
        """Admit the batch when every counter has room (see :mod:`gateway.store.base`)."""
        return self.hit_now(counters)

    def add_now(self, counters: Sequence[Counter], now: int | None = None) -> None:
        """:meth:`add` without the coroutine."""
        now = self.clock() if now is None else now
        for c in counters:
            state, _ = self._slot(c, now)
            state[1] += c.amount
            if state[1] < 0:  # a refund larger than this window: take the rest from the last
                state[2] = max(0, state[2] + state[1])
                state[1] = 0

    async def add(self, counters: Sequence[Counter]) -> None:
        """Add each amount unconditionally (settling reservations; negative refunds)."""
        self.add_now(counters)

    async def ping(self, within: float | None = None) -> None:
        """Always reachable."""

    async def close(self) -> None:
        """Nothing to release; the counters outlive a policy reload on purpose."""


def _weighted(c: Counter, state: list[int], elapsed: int) -> int:
    if c.fixed:
        return state[1]
    return state[2] * (c.period_ms - elapsed) // c.period_ms + state[1]


def _reset(c: Counter, state: list[int], elapsed: int, left: int, need: int) -> int:
    if c.fixed or left >= need:
        return fixed_wait_ms(c.period_ms, elapsed)
    return wait_ms(c.limit, c.period_ms, elapsed, state[1], state[2], need)


_SHARED: dict[str, MemoryStore] = {}


def process_store(name: str) -> MemoryStore:
    """The process-wide store ``name`` (``memory`` or ``local``), created on first use."""
    store = _SHARED.get(name)
    if store is None:
        store = _SHARED[name] = MemoryStore()
    return store
