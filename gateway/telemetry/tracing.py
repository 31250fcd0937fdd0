"""OpenTelemetry tracing: W3C trace context in and out, one server span per request.

Set up once per process (a reload keeps the provider: ``telemetry`` changes need a restart).
Export is OTLP over HTTP/protobuf or gRPC from a child process that receives finished spans in
batches (:mod:`gateway.telemetry.export_process`), so exporting never blocks or fails a request
and its encoding does not compete with the event loop for the GIL: when the queue is full,
spans are dropped. Without an endpoint (policy or
``OTEL_EXPORTER_OTLP_*``) nothing is recorded, but trace ids are still taken from the client
or made up, propagated upstream and returned.
"""

from __future__ import annotations

import logging
import random
import re
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.policy.sections import TelemetryConfig
from gateway.telemetry.export_process import ProcessSpanProcessor, endpoint_set, otlp_exporter

log = logging.getLogger("gateway.tracing")

_PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    """The process's tracer, sampler and propagator."""

    def __init__(self, cfg: TelemetryConfig) -> None:
        exporting = endpoint_set(cfg.otlp_endpoint)
        # Roots are sampled by :meth:`records` before the SDK sees them (unsampled requests
        # take the light path); the SDK then records whatever it is given.
        sampler = ParentBased(ALWAYS_ON if exporting else ALWAYS_OFF)
        self.ratio = cfg.sample_ratio
        self.provider = TracerProvider(
            sampler=sampler, resource=Resource.create({"service.name": cfg.service_name})
        )
        if exporting:
            self.provider.add_span_processor(_processor(cfg))
        self.tracer = self.provider.get_tracer("gateway")
        self.exporting = exporting
        self.stage_spans = cfg.stage_spans
        """Whether stages get child spans (``telemetry.stage_spans``)."""

    def records(self, header: str | None) -> bool:
        """Whether this request's spans are recorded: the client's sampled flag when its
        ``traceparent`` is valid (parent-based), else ``sample_ratio``. The others never
        touch the SDK (~25 µs a request saved at sampling 0.1)."""
        if not self.exporting:
            return False
        m = _TRACEPARENT.match(header) if header else None
        if m and m.group(1) != "0" * 32 and m.group(2) != "0" * 16:
            return bool(int(m.group(3), 16) & 1)
        return random.random() < self.ratio

    def start_server_span(
        self, name: str, carrier: dict[str, str], attributes: dict[str, Any]
    ) -> tuple[Span, Context]:
        """The request's server span (child of the client's ``traceparent`` when valid)."""
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        span = self.tracer.start_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        return span, trace.set_span_in_context(span)

    def start_child(self, name: str, parent: Context, kind: SpanKind = SpanKind.INTERNAL) -> Span:
        """A child span of the request (a stage, the upstream call)."""
        return self.tracer.start_span(name, context=parent, kind=kind)

    def shutdown(self) -> None:
        """Flush what is queued (bounded by the exporter's timeout)."""
        self.provider.shutdown()


def _processor(cfg: TelemetryConfig) -> SpanProcessor:
    """Export from a child process; in this one (a thread) only if it cannot be started."""
    try:
        return ProcessSpanProcessor(cfg)
    except OSError as exc:
        log.warning("span export process not started (%s): exporting in-process", exc)
    exporter = otlp_exporter(cfg.otlp_endpoint, cfg.otlp_protocol)
    assert exporter is not None
    return BatchSpanProcessor(
        exporter,
        max_queue_size=4096,
        schedule_delay_millis=200,
        max_export_batch_size=128,
        export_timeout_millis=2000,
    )


_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def light_context(header: str | None) -> tuple[str, str, str]:
    """(trace id, new span id, flags) without the SDK, for when nothing is exported: the
    client's trace id when its ``traceparent`` is valid, a new one otherwise."""
    m = _TRACEPARENT.match(header) if header else None
    # As OpenTelemetry's RandomIdGenerator (ids are unique, not secret); all zeros is invalid.
    span_id = f"{random.getrandbits(64) or 1:016x}"
    if m and m.group(1) != "0" * 32 and m.group(2) != "0" * 16:
        return m.group(1), span_id, m.group(3)
    return f"{random.getrandbits(128) or 1:032x}", span_id, "00"


def traceparent(span: Span) -> str:
    """The W3C ``traceparent`` header value for ``span``."""
    sc = span.get_span_context()
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


def trace_id(span: Span) -> str:
    """The trace id as 32 hex digits."""
    return f"{span.get_span_context().trace_id:032x}"
