"""state.on_error and the circuit breaker, with a store that fails on command."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from gateway.policy.sections import StateConfig
from gateway.store import Counter, SharedState, StateUnavailable, StoreError, Verdict
from gateway.store.breaker import Breaker
from gateway.telemetry import metrics


class FlakyStore:
    """Admits everything while up; raises StoreError while down. Counts calls."""

    def __init__(self) -> None:
        self.down = False
        self.calls = 0
        self.pings = 0
        self.added: list[Counter] = []

    async def hit(self, counters: Sequence[Counter]) -> Verdict:
        self.calls += 1
        if self.down:
            raise StoreError("timeout")
        n = len(counters)
        return Verdict(True, -1, [c.limit - 1 for c in counters], [1000] * n)

    async def add(self, counters: Sequence[Counter]) -> None:
        self.calls += 1
        if self.down:
            raise StoreError("timeout")
        self.added += counters

    async def ping(self, within: float | None = None) -> None:
        self.pings += 1
        if self.down:
            raise StoreError("refused")

    async def close(self) -> None:
        pass


def _state(mode: str, replicas: int = 1) -> tuple[SharedState, FlakyStore]:
    cfg = StateConfig.model_validate(
        {"url": "redis://127.0.0.1:1", "on_error": mode, "replicas": replicas,
         "breaker_failures": 2, "breaker_probe": "10ms", "key_prefix": f"t-{mode}"}
    )  # fmt: skip
    state = SharedState(cfg)
    fake = FlakyStore()
    state.primary = fake
    state.breaker = Breaker(fake.ping, failures=2, probe=0.01)
    return state, fake


def _value(metric: object) -> float:
    return float(metric._value.get())  # type: ignore[attr-defined]


C = [Counter("k", 10, 60_000)]


async def _outage(mode: str) -> tuple[list[Verdict | str | None], FlakyStore, SharedState]:
    state, fake = _state(mode, replicas=3)
    await state.start()
    results: list[Verdict | str | None] = []
    fake.down = True
    for _ in range(8):
        try:
            results.append(await state.hit(C))
        except StateUnavailable:
            results.append("503")
    return results, fake, state


@pytest.mark.parametrize("mode", ["allow", "deny", "local"])
def test_outage_follows_on_error_and_breaker_stops_calls(mode: str) -> None:
    async def run() -> None:
        fallback = metrics.STATE_FALLBACK.labels(mode)
        before = _value(fallback)
        results, fake, state = await _outage(mode)
        assert fake.calls == 2  # two failures opened the breaker; the rest never waited
        assert state.breaker is not None and state.breaker.open
        assert _value(metrics.STATE_DEGRADED) == 1
        assert _value(fallback) - before == 8
        if mode == "allow":
            assert results == [None] * 8
        elif mode == "deny":
            assert results == ["503"] * 8
        else:  # 10 per minute over 3 replicas: 3 locally
            admitted = [r for r in results if isinstance(r, Verdict) and r.allowed]
            assert len(admitted) == 3
            assert all(isinstance(r, Verdict) and r.local for r in results)
        fake.down = False  # the store is back: the probe closes the breaker on its own
        for _ in range(100):
            if not state.breaker.open:
                break
            await asyncio.sleep(0.01)
        assert not state.breaker.open and _value(metrics.STATE_DEGRADED) == 0
        v = await state.hit(C)
        assert isinstance(v, Verdict) and v.allowed and not v.local
        await state.close()

    asyncio.run(run())


def test_store_down_at_start_opens_the_breaker_before_any_request() -> None:
    async def run() -> None:
        state, fake = _state("allow")
        fake.down = True
        await state.start()
        assert state.breaker is not None and state.breaker.open
        assert await state.hit(C) is None and fake.calls == 0
        await state.close()

    asyncio.run(run())


def test_settle_in_background_and_dropped_while_open() -> None:
    async def run() -> None:
        state, fake = _state("local")
        await state.start()
        state.settle([Counter("t", 100, 1000, -5)], local=False)
        await state.drain()
        assert [c.amount for c in fake.added] == [-5]
        errors = metrics.STATE_ERRORS.labels("settle")
        before = _value(errors)
        assert state.breaker is not None
        state.breaker.trip("test")
        state.settle([Counter("t", 100, 1000, -5)], local=False)
        await state.drain()
        assert len(fake.added) == 1 and _value(errors) == before + 1
        await state.close()

    asyncio.run(run())


def test_readiness_only_fails_when_requests_depend_on_the_store() -> None:
    async def run() -> None:
        for mode, expect in (("deny", "state store unreachable"), ("allow", None)):
            state, fake = _state(mode)
            fake.down = True
            assert await state.readiness() == expect
            await state.close()

    asyncio.run(run())
