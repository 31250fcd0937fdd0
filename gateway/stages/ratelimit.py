"""The rate-limit stage: per client IP, per user by tier, per route, LLM tokens and daily cost.

**Strategy: sliding window counter** (the ``limits`` library's ``SlidingWindowCounter``, same
formula; ``limits.parse_many`` parses the rates). Windows are aligned to the clock (Redis'
clock with a Redis store, so all replicas agree); a counter weighs the previous window's count
by the share of it still inside the sliding window: ``floor(prev * (period - e) / period) +
cur + cost <= limit``. Why: a fixed window admits up to twice the limit across an edge; a
moving window (a log of timestamps) is exact but stores one entry per request — and per
*token* for token limits — so its memory and Redis work grow with the limit. The counter keeps
two integers per key and is exact while the previous window is empty; at an edge it assumes
the previous window's requests were spread evenly, so a burst at the very end of one window
followed by one at the start of the next can pass up to ``limit * (1 + f)`` in one sliding
period (``f`` the part of the previous window still covered). Within one clock-aligned
window, never more than the limit is admitted.

**All counters of a request in one round trip**: the counters a request touches (ip, tier,
route, tokens, budget; each window of ``10/second;500/hour`` is one counter) are checked and,
only when all have room, counted together (memory: without an ``await``; Redis: one Lua script
call). A request refused by one scope costs nothing in the others.

* Keys: ``<prefix>:{ip:<addr>}:<owner>:r<period>``, ``{u:<sub>}:<owner>:r|t<period>`` and
  ``{u:<sub>}:<owner>:b`` (budget), ``{r:<route>}:r<period>``. ``owner`` is ``*`` where the
  route inherits the top-level value (one counter across all such routes) and the route's name
  where it sets its own. Subs outside ``[A-Za-z0-9_.@+=/-]{1,64}`` are hashed.
* Tiers not listed in ``per_tier``/``tokens_per_tier``/``daily_budget_usd`` are not limited
  there; requests without an identity only meet the ip and route limits.
* Tokens and budgets (routes with them read the bounded body first, so their estimate rides
  the same round trip): the request reserves ``prompt bytes / 3 + max_tokens`` tokens and that
  estimate's cost, capped at the limit, and the usage stage settles with the answer's real
  usage. A request that ends without a readable answer (refused by a later stage such as
  the input guardrail, or an upstream error) is refunded by the usage stage's ``on_finish``;
  a client gone mid-stream keeps the estimate as its charge (an over-count, never an
  under-count).
* Answers: ``RateLimit-Limit/-Remaining/-Reset`` of the request scope with the least left and
  ``RateLimit-Policy`` listing every request window, on success too; 429 with ``Retry-After``
  from the real wait and ``error.scope``; ``budget_exceeded`` lasts until 00:00 UTC.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from limits import RateLimitItem, parse_many

from gateway.context import Identity, RequestContext
from gateway.errors import Deny
from gateway.llm.usage import Prices, RequestEstimate, estimate_request
from gateway.pipeline import BuildContext, Phase
from gateway.policy.sections import RateLimitConfig
from gateway.routes import CompiledRoute
from gateway.store import Counter, SharedState, StateUnavailable, Verdict
from gateway.telemetry import metrics

log = logging.getLogger("gateway.ratelimit")

DAY_MS = 86_400_000
RESERVATION = "ratelimit.reservation"
"""``ctx.notes`` key of the :class:`Reservation` the usage stage settles."""
SCOPES = ("ip", "tier", "route", "tokens", "budget")
_REJECTED = {s: metrics.RATELIMIT_REJECTIONS.labels(s) for s in SCOPES}
_SAFE = re.compile(r"[A-Za-z0-9_.@+=/-]{1,64}")
_LIMIT, _REMAINING, _RESET = b"ratelimit-limit", b"ratelimit-remaining", b"ratelimit-reset"
_POLICY, _RETRY = b"ratelimit-policy", b"retry-after"


def key_part(value: str) -> str:
    """An identity as it appears in keys: itself when short and plain, else a hash."""
    if _SAFE.fullmatch(value):
        return value
    return "#" + hashlib.blake2b(value.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class Window:
    """One window of one scope, with its key around the identity and its header texts."""

    scope: str
    limit: int
    period_ms: int
    head: str
    tail: str
    text: str
    fixed: bool = False
    limit_b: bytes = field(init=False)
    policy: bytes = field(init=False)

    def __post_init__(self) -> None:
        seconds = self.period_ms // 1000
        object.__setattr__(self, "limit_b", str(self.limit).encode())
        object.__setattr__(
            self, "policy", f'{self.limit};w={seconds};comment="{self.scope}"'.encode()
        )

    def counter(self, ident: str, amount: int = 1) -> Counter:
        """The counter of this window for ``ident``."""
        return Counter(
            self.head + ident + self.tail, self.limit, self.period_ms, amount, self.fixed
        )


def windows(rate: str, scope: str, head: str, tail: str) -> tuple[Window, ...]:
    """The windows of a rate such as ``10/second;500/hour``; ``tail`` ends with the kind.
    Two windows of the same length would be one counter: the stricter one is kept."""
    strictest: dict[int, RateLimitItem] = {}
    for item in parse_many(rate):
        period = int(item.get_expiry() * 1000)
        if period not in strictest or item.amount < strictest[period].amount:
            strictest[period] = item
    return tuple(
        Window(scope, item.amount, period, head, f"{tail}{period}", str(item))
        for period, item in sorted(strictest.items())
    )


@dataclass(slots=True)
class Reservation:
    """Tokens and cost counted before the call, to be corrected by the real usage."""

    estimate: RequestEstimate
    tokens: list[Counter]
    budget: Counter | None
    local: bool = False


class RateLimitStage:
    """The limits of one route (see the module docstring)."""

    name = "ratelimit"
    phase = Phase.RATE_LIMIT

    def __init__(
        self,
        route: str,
        cfg: RateLimitConfig,
        owners: dict[str, str],
        state: SharedState,
        prices: Prices,
    ) -> None:
        self.state = state
        self.prices = prices
        self.default_max_tokens = cfg.default_max_tokens
        p = state.prefix
        ip, user = f"{p}:{{ip:", f"{p}:{{u:"
        self.ip = windows(cfg.per_ip, "ip", ip, f"}}:{owners['per_ip']}:r") if cfg.per_ip else ()
        tier_tail = f"}}:{owners['per_tier']}:r"
        self.tier = {t: windows(r, "tier", user, tier_tail) for t, r in cfg.per_tier.items()}
        self.route = (
            windows(cfg.per_route, "route", f"{p}:{{r:{route}}}:r", "") if cfg.per_route else ()
        )
        self.route_counters = [w.counter("") for w in self.route]
        tok_tail = f"}}:{owners['tokens_per_tier']}:t"
        self.tokens = {
            t: windows(r, "tokens", user, tok_tail) for t, r in cfg.tokens_per_tier.items()
        }
        bud_tail = f"}}:{owners['daily_budget_usd']}:b"
        self.budget = {
            t: Window(
                "budget",
                round(usd * 1e6),
                DAY_MS,
                user,
                bud_tail,
                f"{usd:g} USD per UTC day",
                True,
            )
            for t, usd in cfg.daily_budget_usd.items()
        }
        self.needs_body = bool(self.tokens or self.budget)
        self.policies: dict[str | None, bytes] = {None: _policy((*self.ip, *self.route))}
        for t, tw in self.tier.items():
            self.policies[t] = _policy((*self.ip, *tw, *self.route))
        self.unavailable = Deny(
            503,
            "state_unavailable",
            "the rate-limit state store is unavailable",
            ((_RETRY, str(state.retry_after).encode()),),
        )

    async def on_request(self, ctx: RequestContext) -> Deny | None:
        """Count the request in every scope that applies; deny when one is over its limit."""
        counters: list[Counter] = []
        scopes: list[Window] = []
        for w in self.ip:
            counters.append(w.counter(ctx.client_ip))
            scopes.append(w)
        ident = ctx.identity
        tier_windows = self.tier.get(ident.tier, ()) if ident is not None else ()
        if tier_windows:
            assert ident is not None
            sub = key_part(ident.sub)
            for w in tier_windows:
                counters.append(w.counter(sub))
                scopes.append(w)
        if self.route:
            counters += self.route_counters
            scopes += self.route
        requests = len(counters)
        reservation = None
        if self.needs_body and ident is not None:
            reservation = self._reserve(ctx, ident, counters, scopes)
        if not counters:
            return None
        try:
            verdict = await self.state.hit(counters)
        except StateUnavailable:
            return self.unavailable
        if verdict is None:
            return None  # store down, on_error: allow
        if not verdict.allowed:
            return self._deny(ctx, scopes, verdict, requests)
        if requests:
            ctx.response_headers += self._headers(ctx, scopes, verdict, requests, -1)
        if reservation is not None:
            reservation.local = verdict.local
            ctx.notes[RESERVATION] = reservation
        return None

    def _reserve(
        self, ctx: RequestContext, ident: Identity, counters: list[Counter], scopes: list[Window]
    ) -> Reservation | None:
        tok = self.tokens.get(ident.tier, ())
        bud = self.budget.get(ident.tier)
        if not tok and bud is None:
            return None
        est = estimate_request(ctx.body or b"", self.default_max_tokens, lambda _: ctx.json_body())
        if est is None:
            return None  # not an LLM call
        ctx.usage.model = est.model
        sub = key_part(ident.sub)
        res = Reservation(est, [w.counter(sub, min(est.tokens, w.limit)) for w in tok], None)
        counters += res.tokens
        scopes += tok
        if bud is not None:
            cost = self.prices.cost(est.model, est.prompt_tokens, est.max_tokens)
            res.budget = bud.counter(sub, max(1, min(micro_usd(cost), bud.limit)))
            counters.append(res.budget)
            scopes.append(bud)
        return res

    def _headers(
        self, ctx: RequestContext, scopes: list[Window], v: Verdict, n: int, at: int
    ) -> list[tuple[bytes, bytes]]:
        if at < 0:
            # the counter with the least room left; of those, the one that resets last
            at = 0
            left, reset = v.remaining, v.reset_ms
            for i in range(1, n):
                if left[i] < left[at] or (left[i] == left[at] and reset[i] > reset[at]):
                    at = i
        w = scopes[at]
        tier = ctx.identity.tier if ctx.identity is not None else None
        return [
            (_LIMIT, w.limit_b),
            (_REMAINING, str(v.remaining[at]).encode()),
            (_RESET, str(-(-v.reset_ms[at] // 1000)).encode()),
            (_POLICY, self.policies.get(tier) or self.policies[None]),
        ]

    def _deny(self, ctx: RequestContext, scopes: list[Window], v: Verdict, n: int) -> Deny:
        w = scopes[v.failed]
        _REJECTED[w.scope].inc()
        wait = max(1, -(-v.reset_ms[v.failed] // 1000))
        headers = [(_RETRY, str(wait).encode())]
        if v.failed < n:
            headers += self._headers(ctx, scopes, v, n, v.failed)
        if w.scope == "budget":
            msg = f"daily budget exceeded for scope budget ({w.text}); it resets at 00:00 UTC"
            return Deny(429, "budget_exceeded", msg, tuple(headers), "budget")
        what = "token limit" if w.scope == "tokens" else "rate limit"
        msg = f"{what} exceeded for scope {w.scope} ({w.text})"
        return Deny(429, "rate_limited", msg, tuple(headers), w.scope)


def micro_usd(usd: float) -> int:
    """USD as whole micro-dollars, rounded up (budgets count in them); float noise such as
    ``0.1 * 1e6 == 100000.00000000001`` is rounded away first (to the nano-dollar: an integer
    ``round``, a tenth of the cost of rounding to 3 decimals)."""
    return -(-round(usd * 1_000_000_000) // 1000)


def _policy(ws: tuple[Window, ...]) -> bytes:
    return b", ".join(w.policy for w in ws)


_FIELDS = ("per_ip", "per_tier", "tokens_per_tier", "daily_budget_usd")


def build_ratelimit_stages(route: CompiledRoute, build: BuildContext) -> list[Any]:
    """The route's limit stage, when its ``rate_limits`` set any limit."""
    cfg = route.rate_limits
    if cfg is None or not (
        cfg.per_ip or cfg.per_tier or cfg.per_route or cfg.tokens_per_tier or cfg.daily_budget_usd
    ):
        return []
    top = build.policy.rate_limits
    owners = {
        f: "*" if top is not None and getattr(top, f) == getattr(cfg, f) else route.name
        for f in _FIELDS
    }
    prices = Prices(build.policy.cost)
    if cfg.daily_budget_usd and not (prices.models or prices.default):
        log.warning("daily_budget_usd is set but cost has no prices: budgets never run out")
    return [RateLimitStage(route.name, cfg, owners, SharedState.of(build), prices)]
