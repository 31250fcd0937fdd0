"""What every counter store offers: batched, all-or-nothing window counters.

The algorithm (the same in :mod:`gateway.store.memory` and the Lua script of
:mod:`gateway.store.redis`) is the *sliding window counter* of the ``limits`` library, with
clock-aligned windows of ``period`` ms. A counter keeps the count of the current window
``c``, of the previous one ``p`` and the current window's index; ``e`` ms into the window::

    weighted = floor(p * (period - e) / period) + c       # fixed counters: weighted = c
    admitted  <=>  weighted + amount <= limit              # for every counter of the batch

A batch (every counter one request touches) is checked and, only when all admit, increased
in one atomic step, so a request refused by one scope costs nothing in the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol


class StoreError(Exception):
    """The store failed or timed out; the message is ours, never the client library's."""


class Counter(NamedTuple):
    """One window counter of a batch (a tuple: made for every request, so cheap to make)."""

    key: str
    limit: int
    period_ms: int
    amount: int = 1
    """What the request adds (``hit``) or the correction (``add``, may be negative)."""
    fixed: bool = False
    """A plain clock-aligned fixed window (daily budgets) instead of a sliding one."""


@dataclass(slots=True)
class Verdict:
    """Outcome of a batch: admitted or not, and per counter what is left and when."""

    allowed: bool
    failed: int
    """Index of the first counter over its limit, ``-1`` when admitted."""
    remaining: list[int]
    """Per counter: units left after this request."""
    reset_ms: list[int]
    """Per counter: ms until one more unit fits when nothing is left, else until the
    current window ends."""
    local: bool = False
    """Decided by the in-process fallback limiter (``on_error: local``)."""


class Store(Protocol):
    """A place for counters shared by the requests of one or many gateway processes."""

    async def hit(self, counters: Sequence[Counter]) -> Verdict:
        """Admit the batch when every counter has room, adding each ``amount``; one round trip."""
        ...

    async def add(self, counters: Sequence[Counter]) -> None:
        """Add each ``amount`` (negative refunds) unconditionally: settling a reservation."""
        ...

    async def ping(self, within: float | None = None) -> None:
        """Raise :class:`StoreError` when the store cannot answer within ``within`` seconds
        (its own timeout when None)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


def wait_ms(limit: int, period_ms: int, elapsed: int, cur: int, prev: int, amount: int) -> int:
    """Ms until ``amount`` more fits in a sliding window counter in this state.

    The previous window's weight falls linearly; when the current count alone leaves no room,
    the wait runs into the next window, where today's count becomes the previous one.
    """
    need = limit - amount - cur
    if need >= 0:
        if prev <= need:
            return 0
        return max(0, _first_fit(period_ms, prev, need) - elapsed)
    rest = period_ms - elapsed
    room = limit - amount
    if room < 0 or cur <= room:
        return rest
    return rest + _first_fit(period_ms, cur, room)


def _first_fit(period_ms: int, prev: int, need: int) -> int:
    # floor(prev * (period - e) / period) <= need  <=>  e > period - (need + 1) * period / prev;
    # the first whole ms past that point, at most the window's end.
    return min(period_ms, period_ms + (-(need + 1) * period_ms) // prev + 1)


def fixed_wait_ms(period_ms: int, elapsed: int) -> int:
    """Ms until a fixed window starts again from zero."""
    return period_ms - elapsed
