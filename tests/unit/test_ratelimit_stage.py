"""The limit and usage stages on the in-process store, driven with hand-made contexts."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

from gateway.context import Identity, RequestContext
from gateway.errors import Deny, error_response
from gateway.pipeline import Pipeline, ResponseHead
from gateway.policy import load_policy_text
from gateway.stages.ratelimit import (
    RESERVATION,
    RateLimitStage,
    Reservation,
    build_ratelimit_stages,
    key_part,
)
from gateway.stages.usage import ANSWERED, UsageStage, build_usage_stages
from gateway.store.base import Verdict
from gateway.store.memory import process_store

_RUN = itertools.count()


def pipeline(limits: str, extra: str = "") -> Pipeline:
    """A pipeline with only the limit and usage stages; a fresh key prefix per call."""
    text = (
        f"version: 1\nupstream: {{url: 'http://127.0.0.1:9'}}\n"
        f"state: {{key_prefix: t{next(_RUN)}-{int(time.time())}}}\n"
        f"rate_limits: {limits}\n{extra}"
    )
    return Pipeline(load_policy_text(text), (build_ratelimit_stages, build_usage_stages))


def ctx(
    p: Pipeline,
    path: str = "/x",
    ip: str = "192.0.2.1",
    who: tuple[str, str] | None = None,
    body: bytes | None = None,
) -> RequestContext:
    c = RequestContext({}, "rid", p.router.match("POST", path), "POST", path, ip, [])
    if who is not None:
        c.identity = Identity(who[0], who[1], {})
    c.body = body
    return c


def limit_stage(c: RequestContext) -> RateLimitStage:
    stages = [s for s in [*c.route.before_body, *c.route.after_body] if s.name == "ratelimit"]
    assert len(stages) == 1 and isinstance(stages[0], RateLimitStage)
    return stages[0]


async def call(c: RequestContext) -> Deny | None:
    return await limit_stage(c).on_request(c)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def body_of(deny: Deny) -> dict[str, Any]:
    status, _, raw = error_response(deny, "rid")
    assert status == 429
    return dict(json.loads(raw)["error"])


def test_per_ip_headers_then_429_naming_the_scope() -> None:
    p = pipeline("{per_ip: 3/minute}")

    async def go() -> None:
        for left in (2, 1, 0):
            c = ctx(p)
            assert await call(c) is None
            h = dict(c.response_headers)
            assert h[b"ratelimit-limit"] == b"3"
            assert h[b"ratelimit-remaining"] == str(left).encode()
            assert 0 < int(h[b"ratelimit-reset"]) <= 60
            assert h[b"ratelimit-policy"] == b'3;w=60;comment="ip"'
        deny = await call(ctx(p))
        assert deny is not None and deny.status == 429 and deny.scope == "ip"
        assert body_of(deny) == {
            "type": "rate_limited",
            "message": "rate limit exceeded for scope ip (3 per 1 minute)",
            "request_id": "rid",
            "scope": "ip",
        }
        h = dict(deny.headers)
        assert 1 <= int(h[b"retry-after"]) <= 60 and h[b"ratelimit-remaining"] == b"0"
        assert await call(ctx(p, ip="192.0.2.2")) is None  # another client

    run(go())


def test_tiers_per_user_and_anonymous_requests() -> None:
    p = pipeline("{per_tier: {free: 2/minute, pro: 5/minute}}")

    async def go() -> None:
        for _ in range(2):
            assert await call(ctx(p, who=("alice", "free"))) is None
        deny = await call(ctx(p, who=("alice", "free")))
        assert deny is not None and deny.scope == "tier"
        assert "scope tier (2 per 1 minute)" in deny.message
        assert await call(ctx(p, who=("bob", "free"))) is None
        c = ctx(p, who=("carol", "pro"))
        assert await call(c) is None
        assert dict(c.response_headers)[b"ratelimit-limit"] == b"5"
        for _ in range(5):  # no identity, unlisted tier: not limited by tier
            assert await call(ctx(p)) is None
            assert await call(ctx(p, who=("dave", "gold"))) is None

    run(go())


def test_several_windows_and_a_refusal_costs_nothing_elsewhere() -> None:
    p = pipeline("{per_ip: 10/minute, per_tier: {free: 2/second;3/hour}}")

    async def go() -> None:
        alice = ("alice", "free")
        assert await call(ctx(p, who=alice)) is None
        assert await call(ctx(p, who=alice)) is None
        deny = await call(ctx(p, who=alice))
        assert deny is not None and "2 per 1 second" in deny.message
        c = ctx(p)  # same IP, no identity: the refusals did not count against the IP
        assert await call(c) is None
        assert dict(c.response_headers)[b"ratelimit-remaining"] == b"7"
        assert dict(c.response_headers)[b"ratelimit-policy"] == b'10;w=60;comment="ip"'

    run(go())


def test_route_overrides_get_their_own_counters() -> None:
    routes = (
        "routes:\n"
        "  - {name: chat, path: /chat, rate_limits: {per_ip: 1/minute}}\n"
        "  - {name: a, path: /a}\n"
        "  - {name: b, path: /b}\n"
        "  - {name: all, path: /all, rate_limits: {per_route: 2/minute}}\n"
    )
    p = pipeline("{per_ip: 2/minute}", routes)

    async def go() -> None:
        assert await call(ctx(p, "/a")) is None
        assert await call(ctx(p, "/b")) is None  # /a and /b share the top-level counter
        assert await call(ctx(p, "/a")) is not None
        assert await call(ctx(p, "/chat")) is None  # its own 1/minute counter
        assert await call(ctx(p, "/chat")) is not None
        assert await call(ctx(p, "/all", ip="198.51.100.1")) is None
        assert await call(ctx(p, "/all", ip="198.51.100.2")) is None
        deny = await call(ctx(p, "/all", ip="198.51.100.3"))
        assert deny is not None and deny.scope == "route"

    run(go())


LLM = (
    "{tokens_per_tier: {free: 1000/minute}, daily_budget_usd: {free: 0.01}}",
    "cost: {models: {m: {input_per_1k: 0.01, output_per_1k: 0.02}}}\n",
)


def llm_body(max_tokens: int) -> bytes:
    return json.dumps({"model": "m", "max_tokens": max_tokens, "messages": []}).encode()


def test_tokens_reserve_the_estimate_and_settle_to_the_usage() -> None:
    p = pipeline(*LLM)
    alice = ("alice", "free")

    async def go() -> None:
        body = llm_body(300)
        c = ctx(p, who=alice, body=body)
        assert limit_stage(c).needs_body
        assert await call(c) is None
        res = c.notes[RESERVATION]
        assert isinstance(res, Reservation)
        assert res.tokens[0].amount == -(-len(body) // 3) + 300
        assert res.budget is not None
        usage = next(s for s in c.route.response if isinstance(s, UsageStage))
        head = ResponseHead(200, [(b"content-type", b"application/json")])
        f = usage.on_response(c, head)
        assert f is not None
        answer = {"model": "m", "usage": {"prompt_tokens": 20, "completion_tokens": 30}}
        raw = json.dumps(answer).encode()
        assert await f.on_chunk(raw[:10]) + await f.on_chunk(raw[10:]) == raw
        assert await f.on_end() == b""
        assert c.usage.input_tokens == 0  # priced and settled once the answer has left:
        usage.on_finish(c)
        assert ANSWERED not in c.notes and RESERVATION not in c.notes
        assert (c.usage.input_tokens, c.usage.output_tokens, c.usage.estimated) == (20, 30, False)
        assert abs(c.usage.cost_usd - (20 * 0.01 + 30 * 0.02) / 1000) < 1e-12
        key = res.tokens[0].key
        state = process_store("memory").hit_now([res.tokens[0].__class__(key, 1000, 60_000, 0)])
        assert state.remaining == [1000 - 50]  # settled to 50 real tokens

        # a burst cannot overshoot: each request reserves its whole estimate up front
        tokens_only = pipeline("{tokens_per_tier: {free: 1000/minute}}")
        burst = [ctx(tokens_only, who=("bob", "free"), body=body) for _ in range(10)]
        denies = await asyncio.gather(*(call(b) for b in burst))
        assert sum(d is None for d in denies) == 1000 // (-(-len(body) // 3) + 300) == 3
        deny = next(d for d in denies if d is not None)
        assert deny.scope == "tokens" and "token limit exceeded" in deny.message
        assert b"ratelimit-limit" not in dict(deny.headers)  # RateLimit-* describe requests

    run(go())


def test_error_answers_refund_and_budget_runs_out_until_midnight() -> None:
    p = pipeline(*LLM)
    carol = ("carol", "free")

    async def go() -> None:
        c = ctx(p, who=carol, body=llm_body(100))
        assert await call(c) is None
        usage = next(s for s in c.route.response if isinstance(s, UsageStage))
        usage.finish(c, 503, None)  # nothing used: everything refunded
        # a budget of 1 cent at 2 cents per 1000 output tokens: 500 output tokens spend it
        c = ctx(p, who=carol, body=llm_body(10))
        assert await call(c) is None
        usage.finish(c, 200, _tokens(0, 499))
        assert await call(ctx(p, who=carol, body=llm_body(10))) is not None  # 10 won't fit
        deny = await call(ctx(p, who=carol, body=llm_body(1)))
        assert deny is not None and deny.type == "budget_exceeded" and deny.scope == "budget"
        assert "0.01 USD per UTC day" in deny.message
        to_midnight = 86400 - int(time.time()) % 86400
        assert abs(int(dict(deny.headers)[b"retry-after"]) - to_midnight) <= 2
        assert await call(ctx(p, who=("dave", "free"), body=llm_body(10))) is None

    run(go())


def _tokens(inp: int, out: int) -> Any:
    from gateway.llm.usage import Tokens

    return Tokens(inp, out, "m")


def test_non_llm_bodies_reserve_nothing() -> None:
    p = pipeline(*LLM)

    async def go() -> None:
        for body in (b"", b"not json", b"[1,2]"):
            c = ctx(p, who=("erin", "free"), body=body)
            assert await call(c) is None and RESERVATION not in c.notes

    run(go())


def test_usage_stage_is_attached_where_usage_matters() -> None:
    plain = Pipeline(
        load_policy_text("version: 1\nupstream: {url: 'http://127.0.0.1:9'}\n"),
        (build_ratelimit_stages, build_usage_stages),
    )
    assert plain.router.fallback.response == [] and plain.build.shared == {}
    layered = load_policy_text(
        "version: 1\nupstream: {url: 'http://127.0.0.1:9'}\n"
        "routes: [{name: chat, path: /chat, layer: layer3}]\n"
    )
    route = Pipeline(layered, ()).router.routes[0]
    names = [s.name for s in build_usage_stages(route, Pipeline(layered, ()).build)]
    assert names == ["usage", "include_usage"]  # an LLM route: streams are asked for usage
    priced = load_policy_text(
        "version: 1\nupstream: {url: 'http://127.0.0.1:9'}\n"
        "cost: {default: {input_per_1k: 1, output_per_1k: 1}}\n"
    )
    other = Pipeline(priced, ()).router.fallback
    assert [s.name for s in build_usage_stages(other, Pipeline(priced, ()).build)] == ["usage"]


def test_key_parts_are_plain_or_hashed() -> None:
    assert key_part("alice@example.com") == "alice@example.com"
    odd = key_part("x}:{y")
    assert odd.startswith("#") and len(odd) == 33 and odd == key_part("x}:{y")
    assert key_part("a" * 65) != key_part("a" * 66)


def test_headers_report_the_counter_with_least_room_then_the_latest_reset() -> None:
    """Of a request's counters, the headers show the one with the least room left; between
    equals, the one that resets last; between those, the first."""
    p = pipeline("{per_ip: '10/second;10/minute;100/hour'}")
    c = ctx(p)
    stage = limit_stage(c)
    scopes = list(stage.ip)
    assert [w.period_ms for w in scopes] == [1000, 60_000, 3_600_000]

    def chosen(remaining: list[int], reset: list[int]) -> tuple[bytes, bytes, bytes]:
        verdict = Verdict(True, -1, remaining, reset)
        h = dict(stage._headers(c, scopes, verdict, 3, -1))
        return h[b"ratelimit-limit"], h[b"ratelimit-remaining"], h[b"ratelimit-reset"]

    assert chosen([5, 3, 7], [1000, 2000, 3000]) == (b"10", b"3", b"2")  # least room
    assert chosen([5, 7, 3], [1000, 2000, 3000]) == (b"100", b"3", b"3")
    assert chosen([3, 3, 9], [1000, 60_000, 9]) == (b"10", b"3", b"60")  # tie: resets later
    assert chosen([3, 3, 3], [500, 500, 3_000_000]) == (b"100", b"3", b"3000")
    assert chosen([3, 3, 3], [500, 1500, 1500]) == (b"10", b"3", b"2")  # then the first
    one = dict(stage._headers(c, scopes[:1], Verdict(True, -1, [4], [900]), 1, -1))
    assert one[b"ratelimit-limit"] == b"10" and one[b"ratelimit-remaining"] == b"4"
