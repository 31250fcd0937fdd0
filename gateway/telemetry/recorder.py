"""What happens when a request ends: metrics, the span's closing attributes, one log line."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import Status, StatusCode

from gateway.telemetry import request_metrics as m

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
        self._requests: dict[tuple[str, str, int], Any] = {}
        self._durations: dict[tuple[str, str], Any] = {}
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        # labels() takes a lock and builds a tuple each call (~4 µs): bind each child once.
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def model_label(self, model: str | None) -> str:
        """The model, when the price table names it; ``other`` otherwise (bounded label)."""
        return model if model in self.models else "other"

    def finish(self, ctx: RequestContext) -> None:
        """Record the request; never raises into the request path."""
        elapsed = time.perf_counter() - ctx.started
        method = m.method_label(ctx.method)
        route = ctx.route.name
        key = (method, route, ctx.status)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = m.HTTP_REQUESTS.labels(method, route, str(ctx.status))
        counter.inc()
        hist = self._durations.get((method, route))
        if hist is None:
            hist = self._durations[(method, route)] = m.HTTP_DURATION.labels(method, route)
        hist.observe(elapsed)
        usage = ctx.usage
        model = self.model_label(usage.model) if usage.model else None
        if ctx.upstream_seconds is not None and ctx.route.layer:
            self._child(m.INFERENCE_LATENCY, ctx.route.layer, model or "other").observe(
                ctx.upstream_seconds
            )
        tier = ctx.identity.tier if ctx.identity else "anonymous"
        if model is not None and (usage.input_tokens or usage.output_tokens):
            self._child(m.LLM_TOKENS, model, "input").inc(usage.input_tokens)
            self._child(m.LLM_TOKENS, model, "output").inc(usage.output_tokens)
            self._child(m.LLM_COST, model, tier).inc(usage.cost_usd)  # tiers: auth checked them
            self._child(m.COST_PER_REQUEST, self.service, route).observe(usage.cost_usd)
            if usage.estimated:
                m.ESTIMATED_USAGE.inc()
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
            span.end()
        if self.log_requests and access.isEnabledFor(logging.INFO):
            access.info("request", extra=self._fields(ctx, elapsed, tier))

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
