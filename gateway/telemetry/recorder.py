"""What happens when a request ends: metrics, the span's closing attributes, one log line."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import Status, StatusCode

from gateway.telemetry import request_metrics as m
from gateway.telemetry.metrics import Update, fast_inc, fast_observe

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.policy.schema import Policy

access = logging.getLogger("gateway.access")


class Recorder:
    """Per-policy bookkeeping of finished requests; label children are bound once."""

    def __init__(self, policy: Policy) -> None:
        self.service = policy.telemetry.service_name
        self.models = frozenset(policy.cost.models) if policy.cost else frozenset()
        self.log_requests = policy.telemetry.access_log
        self.log_prompts = policy.telemetry.log_prompts
        # labels() takes a lock and builds a tuple each call (~4 µs): each label set's children
        # are bound once, at the request that first uses them (so a series appears in the
        # exposition exactly when it did with a labels() call per request).
        self._http: dict[tuple[str, str, int], tuple[Update, Update]] = {}
        self._llm: dict[tuple[str, str, str], _LlmChildren] = {}
        self._inference: dict[tuple[str, str], Update] = {}
        self._added: dict[str, Update] = {}
        self._estimated = fast_inc(m.ESTIMATED_USAGE)

    def model_label(self, model: str | None) -> str:
        """The model, when the price table names it; ``other`` otherwise (bounded label)."""
        return model if model in self.models else "other"

    def finish(self, ctx: RequestContext) -> None:
        """Record the request; never raises into the request path."""
        elapsed = (ctx.ended or time.perf_counter()) - ctx.started
        method = m.method_label(ctx.method)
        route = ctx.route
        name = route.name
        status = ctx.status
        http = self._http.get((method, name, status))
        if http is None:
            http = self._bind_http(method, name, status)
        http[0](1)
        http[1](elapsed)
        if ctx.upstream_waited:
            added = self._added.get(name)
            if added is None:
                added = self._added[name] = fast_observe(m.ADDED_LATENCY.labels(name))
            added(max(0.0, elapsed - ctx.upstream_waited))
        usage = ctx.usage
        model = self.model_label(usage.model) if usage.model else None
        if ctx.upstream_seconds is not None and route.layer:
            key = (route.layer, model or "other")
            latency = self._inference.get(key)
            if latency is None:
                latency = self._inference[key] = fast_observe(m.INFERENCE_LATENCY.labels(*key))
            latency(ctx.upstream_seconds)
        tier = ctx.identity.tier if ctx.identity else "anonymous"
        if model is not None and (usage.input_tokens or usage.output_tokens):
            llm = self._llm.get((model, tier, name))
            if llm is None:
                llm = self._llm[(model, tier, name)] = _LlmChildren(self.service, model, tier, name)
            llm.record(usage.input_tokens, usage.output_tokens, usage.cost_usd)
            if usage.estimated:
                self._estimated(1)
        span = ctx.span
        if span is not None and span.is_recording():
            span.set_attribute("http.response.status_code", ctx.status)
            span.set_attribute("http.route", ctx.route.prefix)
            if usage.model:
                span.set_attribute("gen_ai.request.model", usage.model)
                span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)
                span.set_attribute("gen_ai.usage.cost_usd", usage.cost_usd)
            if ctx.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
        if span is not None:
            span.end(ctx.ended_ns or None)
        if self.log_requests and access.isEnabledFor(logging.INFO):
            access.info("request", extra=self._fields(ctx, elapsed, tier))

    def _bind_http(self, method: str, route: str, status: int) -> tuple[Update, Update]:
        http = (
            fast_inc(m.HTTP_REQUESTS.labels(method, route, str(status))),
            fast_observe(m.HTTP_DURATION.labels(method, route)),
        )
        self._http[(method, route, status)] = http
        return http

    def _fields(self, ctx: RequestContext, elapsed: float, tier: str) -> dict[str, Any]:
        # Never the Authorization header, cookies, tokens, the prompt or the answer.
        usage = ctx.usage
        fields: dict[str, Any] = {
            "request_id": ctx.request_id,
            "trace_id": ctx.trace_id,
            "span_id": ctx.span_id,
            "method": ctx.method,
            "route": ctx.route.name,
            "path": ctx.path,
            "status": ctx.status,
            "duration_ms": round(elapsed * 1000, 3),
            "client_ip": ctx.client_ip,
            "user": ctx.identity.sub if ctx.identity else None,
            "tier": tier,
        }
        if usage.model:
            fields.update(
                model=usage.model,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cost_usd=round(usage.cost_usd, 8),
                usage_estimated=usage.estimated,
            )
        if ctx.notes:
            fields.update(ctx.notes)
        if self.log_prompts and ctx.prompt_texts:
            fields["prompt"] = "\n".join(ctx.prompt_texts)[: self.log_prompts]
        return fields


class _LlmChildren:
    """The token, cost and cost-per-request children of one model, tier and route."""

    __slots__ = ("cost", "cost_fast", "input", "input_fast", "output", "output_fast", "per_request")

    def __init__(self, service: str, model: str, tier: str, route: str) -> None:
        self.input = m.LLM_TOKENS.labels(model, "input")
        self.output = m.LLM_TOKENS.labels(model, "output")
        self.cost = m.LLM_COST.labels(model, tier)  # tiers: auth checked them
        self.per_request = fast_observe(m.COST_PER_REQUEST.labels(service, route))
        self.input_fast = fast_inc(self.input)
        self.output_fast = fast_inc(self.output)
        self.cost_fast = fast_inc(self.cost)

    def record(self, input_tokens: int, output_tokens: int, cost_usd: float) -> None:
        """Count one request's tokens and cost."""
        if input_tokens >= 0 and output_tokens >= 0 and not cost_usd < 0:
            self.input_fast(input_tokens)
            self.output_fast(output_tokens)
            self.cost_fast(cost_usd)
        else:  # the library refuses a negative amount: let it, as it always did
            self.input.inc(input_tokens)
            self.output.inc(output_tokens)
            self.cost.inc(cost_usd)
        self.per_request(cost_usd)
