"""The usage stage: reads the LLM usage of each answer, prices it and settles reservations.

It runs last among response stages (phase ``USAGE``) on routes that have token or budget
limits, an inference ``layer``, or when the policy has a ``cost`` table. Its body filter
streams (``buffer = False``): JSON answers are collected up to 4 MiB and read at the end;
event streams are scanned line by line for ``data:`` lines carrying ``usage`` (OpenAI sends
it with ``stream_options.include_usage``; Anthropic in ``message_start``/``message_delta``).

At the end of the body it reads the usage; once the answer has left (``on_finish``, with the
request's other bookkeeping) it fills ``ctx.usage`` (model, tokens, cost, ``estimated`` when
the answer reported nothing) and settles the rate-limit stage's reservation: the difference
between the real usage and the reserved estimate goes to the token and budget counters in one
background round trip, so the client never waits for it. An error answer (4xx/5xx) without
usage refunds the reservation; a 2xx answer without usage keeps the estimate as the charge.
"""

from __future__ import annotations

from typing import Any

from gateway.context import RequestContext
from gateway.llm.include_usage import UNREAD, UsageEventStripper, wants_injection
from gateway.llm.usage import ANSWER_DOC, JsonUsage, Prices, SseUsage, Tokens
from gateway.pipeline import BuildContext, Phase, ResponseHead
from gateway.routes import CompiledRoute
from gateway.stages.ratelimit import RESERVATION, Reservation, micro_usd
from gateway.store import Counter, SharedState

#: Note set when the gateway asked for stream usage itself (also shown in the access log).
INJECTED = "usage_requested_by_gateway"
#: The answer's status and usage, from the end of its body to ``on_finish`` (which runs after
#: the answer's bytes are written, see :class:`gateway.app.GatewayApp`; popped before the log).
ANSWERED = "_usage_answered"


class UsageFilter:
    """Watches one answer's body; passes every chunk through unchanged, except the usage
    events the gateway asked for on the client's behalf."""

    __slots__ = ("ctx", "scanner", "stage", "status", "stripper")
    buffer = False

    def __init__(
        self, stage: UsageStage, ctx: RequestContext, status: int, scanner: JsonUsage | SseUsage
    ) -> None:
        self.stage = stage
        self.ctx = ctx
        self.status = status
        self.scanner = scanner
        asked = isinstance(scanner, SseUsage) and ctx.notes.get(INJECTED) is True
        self.stripper = UsageEventStripper() if asked else None

    async def on_chunk(self, chunk: bytes) -> bytes:
        """Scan and pass through."""
        if chunk:
            self.scanner.feed(chunk)
        return self.stripper.feed(chunk) if self.stripper is not None else chunk

    async def on_end(self) -> bytes:
        """Read the usage; adds nothing to the body. It is priced and settled in
        :meth:`UsageStage.on_finish`, once the answer has left."""
        scanner = self.scanner
        ctx = self.ctx
        if isinstance(scanner, JsonUsage):
            tokens = scanner.result(ctx.notes.pop(ANSWER_DOC, None))
        else:
            tokens = scanner.result()
        ctx.notes[ANSWERED] = (self.status, tokens)
        return self.stripper.end() if self.stripper is not None else b""


class IncludeUsageStage:
    """On LLM routes, asks an OpenAI-compatible upstream to report the usage of a stream the
    client did not ask usage for (see :mod:`gateway.llm.include_usage`)."""

    name = "include_usage"
    phase = Phase.USAGE
    needs_body = True

    async def on_request(self, ctx: RequestContext) -> None:
        """Rewrite the body when it is a streamed OpenAI request without ``include_usage``."""
        if ctx.body:
            new = wants_injection(ctx.path, ctx.body, ctx.decoded_body(UNREAD))
            if new is not None:
                ctx.body = new
                ctx.notes[INJECTED] = True


class UsageStage:
    """Usage, cost and settlement for one route."""

    name = "usage"
    phase = Phase.USAGE

    def __init__(self, prices: Prices, state: SharedState | None) -> None:
        self.prices = prices
        self.state = state

    def on_response(self, ctx: RequestContext, head: ResponseHead) -> UsageFilter | None:
        """A filter for JSON and event-stream answers; others settle at once."""
        for k, v in head.headers:
            if k == b"content-type":
                if v.startswith(b"text/event-stream"):
                    return UsageFilter(self, ctx, head.status, SseUsage())
                if v.find(b"json") >= 0:  # `in` on bytes first raises and clears a TypeError
                    return UsageFilter(self, ctx, head.status, JsonUsage())
                break
        self.finish(ctx, head.status, None)
        return None

    def on_finish(self, ctx: RequestContext) -> None:
        """Price and settle the usage the answer reported; or, when the request ended
        without its answer being read to the end (denied after the reservation, upstream
        error, client gone), settle what is still reserved."""
        answered = ctx.notes.pop(ANSWERED, None)
        if answered is not None:
            self.finish(ctx, *answered)
        elif RESERVATION in ctx.notes:
            self.finish(ctx, ctx.status or 499, None)

    def finish(self, ctx: RequestContext, status: int, tokens: Tokens | None) -> None:
        """Fill ``ctx.usage`` and settle the reservation, if any."""
        res: Reservation | None = ctx.notes.pop(RESERVATION, None)
        usage = ctx.usage
        if tokens is not None:
            usage.model = tokens.model or usage.model
            usage.input_tokens, usage.output_tokens = tokens.input, tokens.output
            usage.estimated = False
        elif res is not None and status < 400:
            usage.input_tokens = res.estimate.prompt_tokens
            usage.output_tokens = res.estimate.max_tokens
            usage.estimated = True
        else:
            if res is not None:
                self._settle(res, 0, 0.0)  # an error answer without usage: nothing was used
            return
        usage.cost_usd = self.prices.cost(usage.model, usage.input_tokens, usage.output_tokens)
        if res is not None and tokens is not None:
            self._settle(res, tokens.input + tokens.output, usage.cost_usd)

    def _settle(self, res: Reservation, tokens: int, usd: float) -> None:
        state = self.state
        if state is None:
            return
        fixes = [
            Counter(c.key, c.limit, c.period_ms, tokens - c.amount, c.fixed)
            for c in res.tokens
            if c.amount != tokens  # nothing to correct: not written
        ]
        b = res.budget
        if b is not None:
            micro = micro_usd(usd)
            if b.amount != micro:
                fixes.append(Counter(b.key, b.limit, b.period_ms, micro - b.amount, b.fixed))
        state.settle(fixes, res.local)


def build_usage_stages(route: CompiledRoute, build: BuildContext) -> list[Any]:
    """The usage stage where usage matters: LLM limits, an inference layer, or prices."""
    cfg = route.rate_limits
    limited = cfg is not None and bool(cfg.tokens_per_tier or cfg.daily_budget_usd)
    if not (limited or route.layer or build.policy.cost):
        return []
    state = SharedState.of(build) if limited else None
    stages: list[Any] = [UsageStage(Prices(build.policy.cost), state)]
    if limited or route.layer:  # an LLM route: make streams report their usage
        stages.append(build.share("include_usage", IncludeUsageStage))
    return stages
