"""OpenTelemetry tracing: W3C trace context in and out, one server span per request.

Set up once per process (a reload keeps it: ``telemetry`` changes need a restart). The
gateway's spans are recorded as plain values (:mod:`gateway.telemetry.spans`), not SDK spans.
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
from collections.abc import Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.policy.sections import TelemetryConfig
from gateway.telemetry.export_process import (
    ProcessSpanProcessor,
    endpoint_set,
    otlp_exporter,
    rebuild,
)
from gateway.telemetry.spans import Flat, LeanSpan, SpanOwner

log = logging.getLogger("gateway.tracing")

_PROPAGATOR = TraceContextTextMapPropagator()
SCOPE: Flat = ("gateway", "", None)
"""The instrumentation scope of the gateway's spans (as the SDK's ``get_tracer("gateway")``)."""


class Tracing:
    """The process's sampler, span recorder and export."""

    def __init__(self, cfg: TelemetryConfig) -> None:
        exporting = endpoint_set(cfg.otlp_endpoint)
        self.ratio = cfg.sample_ratio
        resource = Resource.create({"service.name": cfg.service_name})
        self.processor: SpanProcessor | None = _processor(cfg) if exporting else None
        """Where ended spans go (None: nothing is exported, so nothing is recorded)."""
        self._owner = SpanOwner(
            _sink(self.processor), (dict(resource.attributes), resource.schema_url), SCOPE
        )
        self.exporting = exporting
        self.stage_spans = cfg.stage_spans
        """Whether stages get child spans (``telemetry.stage_spans``)."""

    def records(self, header: str | None) -> bool:
        """Whether this request's spans are recorded: the client's sampled flag when its
        ``traceparent`` is valid (parent-based), else ``sample_ratio``. The others never
        record a span (~25 µs a request saved at sampling 0.1)."""
        if not self.exporting:
            return False
        m = _TRACEPARENT.match(header) if header else None
        if m and m.group(1) != "0" * 32 and m.group(2) != "0" * 16:
            return bool(int(m.group(3), 16) & 1)
        return random.random() < self.ratio

    def start_server_span(
        self, name: str, carrier: dict[str, str], attributes: dict[str, Any]
    ) -> LeanSpan | None:
        """The request's server span (child of the client's ``traceparent`` when valid);
        None when that parent is valid but not sampled (in a ``traceparent`` version
        :meth:`records` does not read), as the SDK's parent-based sampler decides."""
        parent = None
        if carrier:
            sc = trace.get_current_span(_PROPAGATOR.extract(carrier)).get_span_context()
            if sc.is_valid:
                if not sc.trace_flags.sampled:
                    return None
                state = sc.trace_state.to_header()
                parent = (sc.trace_id, sc.span_id, sc.is_remote, int(sc.trace_flags), state)
        return self._owner.root(name, parent, SpanKind.SERVER, attributes)

    def start_child(
        self, name: str, parent: LeanSpan, kind: SpanKind = SpanKind.INTERNAL
    ) -> LeanSpan:
        """A child span of the request (a stage, the upstream call)."""
        return parent.child(name, kind)

    def shutdown(self) -> None:
        """Flush what is queued (bounded by the exporter's timeout)."""
        if self.processor is not None:
            self.processor.shutdown()


def _sink(processor: SpanProcessor | None) -> Callable[[Flat], None]:
    if isinstance(processor, ProcessSpanProcessor):
        return processor.record
    if processor is None:
        return lambda flat: None
    on_end = processor.on_end
    return lambda flat: on_end(rebuild(flat))


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


def traceparent(span: LeanSpan) -> str:
    """The W3C ``traceparent`` header value for ``span``."""
    return span.traceparent()
