"""How the tracer sets up the process: spans are exported by a child process."""

from __future__ import annotations

import sys

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.policy.sections import TelemetryConfig
from gateway.telemetry.export_process import ProcessSpanProcessor, flatten, rebuild
from gateway.telemetry.tracing import Tracing


def test_exporting_starts_a_child_that_ends_with_the_tracer() -> None:
    before = sys.getswitchinterval()
    assert Tracing(TelemetryConfig()).provider._active_span_processor._span_processors == ()
    tracing = Tracing(TelemetryConfig(otlp_endpoint="http://127.0.0.1:9"))
    assert tracing.exporting and sys.getswitchinterval() == before
    (processor,) = tracing.provider._active_span_processor._span_processors
    assert isinstance(processor, ProcessSpanProcessor)
    child = processor._child
    assert child.poll() is None  # running
    tracing.shutdown()
    assert child.poll() == 0  # it exits once its pipe is closed


class _Capture(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: object) -> SpanExportResult:
        self.spans.extend(spans)  # type: ignore[call-overload]
        return SpanExportResult.SUCCESS


def test_a_span_handed_to_the_child_encodes_exactly_as_the_original() -> None:
    capture = _Capture()
    provider = TracerProvider(resource=Resource.create({"service.name": "svc"}))
    provider.add_span_processor(SimpleSpanProcessor(capture))
    tracer = provider.get_tracer("gateway", "1.0")
    carrier = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "k=v,a=b",
    }
    parent = TraceContextTextMapPropagator().extract(carrier)
    server = tracer.start_span(
        "POST chat", context=parent, kind=SpanKind.SERVER, attributes={"a": "x", "n": 3}
    )
    child = tracer.start_span("upstream", context=set_span_in_context(server))
    child.add_event("retry", {"attempt": 2, "ok": False, "ratio": 0.5, "tags": ["a", "b"]})
    child.end()
    server.set_attribute("http.response.status_code", 502)
    server.set_status(Status(StatusCode.ERROR, "bad gateway"))
    server.end()
    assert len(capture.spans) == 2
    again = [rebuild(flatten(s)) for s in capture.spans]
    assert encode_spans(again) == encode_spans(capture.spans)


def test_a_dead_child_drops_spans_without_failing_the_caller() -> None:
    processor = ProcessSpanProcessor(TelemetryConfig(otlp_endpoint="http://127.0.0.1:9"))
    provider = TracerProvider()
    provider.add_span_processor(processor)
    processor._child.kill()
    processor._child.wait()
    for _ in range(3):
        provider.get_tracer("t").start_span("s").end()
        assert processor.force_flush()  # no exception reaches the request path
    assert processor._broken
    provider.shutdown()
