"""How the tracer sets up the process: spans are exported by a child process."""

from __future__ import annotations

import os
import pickle
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.policy.sections import TelemetryConfig
from gateway.telemetry.export_process import (
    _HEADER,
    ProcessSpanProcessor,
    flatten,
    gathered,
    rebuild,
)
from gateway.telemetry.metrics import SPANS_DROPPED
from gateway.telemetry.spans import Flat
from gateway.telemetry.tracing import Tracing


def test_exporting_starts_a_child_that_ends_with_the_tracer() -> None:
    before = sys.getswitchinterval()
    assert Tracing(TelemetryConfig()).processor is None
    tracing = Tracing(TelemetryConfig(otlp_endpoint="http://127.0.0.1:9"))
    assert tracing.exporting and sys.getswitchinterval() == before
    processor = tracing.processor
    assert isinstance(processor, ProcessSpanProcessor)
    child = processor._child
    assert child.poll() is None  # running
    tracing.shutdown()
    assert child.poll() == 0  # it exits once its pipe is closed


def _settled(read: Callable[[], int], want: int) -> int:
    # the child lowers its own priority once it has started
    deadline = time.monotonic() + 10
    while (got := read()) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


@pytest.mark.parametrize("priority", ["low", "idle"])
def test_the_export_child_yields_the_cpu(priority: str) -> None:
    cfg = TelemetryConfig(otlp_endpoint="http://127.0.0.1:9", export_priority=priority)
    processor = ProcessSpanProcessor(cfg)
    pid = processor._child.pid
    try:
        if priority == "idle":
            assert _settled(lambda: os.sched_getscheduler(pid), os.SCHED_IDLE) == os.SCHED_IDLE
        else:
            mine = os.getpriority(os.PRIO_PROCESS, 0)
            nice = _settled(lambda: os.getpriority(os.PRIO_PROCESS, pid), min(19, mine + 10))
            assert nice == min(19, mine + 10)
            assert os.sched_getscheduler(pid) == os.SCHED_OTHER
    finally:
        processor.shutdown()


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
    # the spans of one process share one resource and one scope object
    assert again[0].resource is again[1].resource
    assert again[0].instrumentation_scope is again[1].instrumentation_scope


def test_resources_with_list_values_are_rebuilt_too() -> None:
    capture = _Capture()
    resource = Resource.create({"service.name": "svc", "tags": ["a", "b"]})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(capture))
    provider.get_tracer("gateway").start_span("one").end()
    again = [rebuild(flatten(s)) for s in capture.spans]
    assert again[0].resource == resource
    assert encode_spans(again) == encode_spans(capture.spans)


def _dropped(reason: str) -> float:
    return SPANS_DROPPED.labels(reason)._value.get()


def test_a_dead_child_drops_spans_without_failing_the_caller() -> None:
    processor = ProcessSpanProcessor(TelemetryConfig(otlp_endpoint="http://127.0.0.1:9"))
    provider = TracerProvider()
    provider.add_span_processor(processor)
    processor._child.kill()
    processor._child.wait()
    gone = _dropped("export_process_gone")
    for _ in range(3):
        provider.get_tracer("t").start_span("s").end()
        assert processor.force_flush()  # no exception reaches the request path
    assert processor._broken
    assert _dropped("export_process_gone") == gone + 3  # counted, one a span
    provider.shutdown()


def test_a_full_queue_drops_its_oldest_spans_and_counts_them() -> None:
    processor = ProcessSpanProcessor(
        TelemetryConfig(otlp_endpoint="http://127.0.0.1:9"), schedule_delay=60, max_queue_size=2
    )
    full, unpicklable = _dropped("queue_full"), _dropped("unpicklable")
    for i in range(5):
        processor.record(("span", i))
    assert list(processor._queue) == [("span", 3), ("span", 4)]
    assert _dropped("queue_full") == full + 3
    processor.record(("span", lambda: None))  # pickle cannot carry it
    processor.force_flush()
    assert _dropped("unpicklable") == unpicklable + 2  # the whole batch
    processor.shutdown()


class _Ids(IdGenerator):
    """Hands the SDK the ids the gateway's spans drew, in order."""

    def __init__(self, trace_id: int, span_ids: list[int]) -> None:
        self.trace_id = trace_id
        self.span_ids = span_ids

    def generate_trace_id(self) -> int:
        return self.trace_id

    def generate_span_id(self) -> int:
        return self.span_ids.pop(0)

    def is_trace_id_random(self) -> bool:
        return True  # as the SDK's default RandomIdGenerator


@pytest.mark.parametrize(
    "carrier",
    [
        {},
        {
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "k=v,a=b",
        },
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03"},
    ],
    ids=["root", "remote-parent-with-state", "remote-parent-random-flag"],
)
def test_the_gateways_spans_encode_exactly_as_the_sdks(carrier: dict[str, str]) -> None:
    tracing = Tracing(TelemetryConfig(service_name="svc"))
    flats: list[Flat] = []
    tracing._owner.sink = flats.append
    attrs = {"http.request.method": "POST", "url.path": "/v1/chat", "n": 3}
    server = tracing.start_server_span("POST chat", carrier, attrs)
    assert server is not None
    upstream = tracing.start_child("upstream", server, SpanKind.CLIENT)
    stage = tracing.start_child("guard_input", server)
    stage.end()
    upstream.end()
    upstream.set_attribute("late", 1)  # ignored once ended, as the SDK does
    server.set_attribute("http.response.status_code", 502)
    server.set_attribute("gen_ai.usage.cost_usd", 0.25)
    server.set_status(Status(StatusCode.ERROR, "bad gateway"))
    server.set_status(Status(StatusCode.UNSET))  # ignored
    server.end()
    server.end()  # a second end hands nothing over
    assert [f[0] for f in flats] == ["guard_input", "upstream", "POST chat"]

    capture = _Capture()
    ids = _Ids(server.trace_id, [server.span_id, upstream.span_id, stage.span_id])
    provider = TracerProvider(
        resource=Resource.create({"service.name": "svc"}),
        id_generator=ids,
        sampler=ParentBased(ALWAYS_ON),
    )
    provider.add_span_processor(SimpleSpanProcessor(capture))
    tracer = provider.get_tracer("gateway")
    by_name = {f[0]: f for f in flats}
    parent = TraceContextTextMapPropagator().extract(carrier) if carrier else None
    sdk_server = tracer.start_span(
        "POST chat",
        context=parent,
        kind=SpanKind.SERVER,
        attributes=attrs,
        start_time=by_name["POST chat"][4],
    )
    in_server = set_span_in_context(sdk_server)
    sdk_up = tracer.start_span(
        "upstream", in_server, SpanKind.CLIENT, start_time=by_name["upstream"][4]
    )
    sdk_stage = tracer.start_span("guard_input", in_server, start_time=by_name["guard_input"][4])
    sdk_stage.end(end_time=by_name["guard_input"][5])
    sdk_up.end(end_time=by_name["upstream"][5])
    sdk_server.set_attribute("http.response.status_code", 502)
    sdk_server.set_attribute("gen_ai.usage.cost_usd", 0.25)
    sdk_server.set_status(Status(StatusCode.ERROR, "bad gateway"))
    sdk_server.end(end_time=by_name["POST chat"][5])

    assert encode_spans([rebuild(f) for f in flats]) == encode_spans(capture.spans)
    sc = sdk_up.get_span_context()
    assert upstream.traceparent() == (
        f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"
    )


def test_an_unsampled_parent_the_ratio_check_did_not_read_records_nothing() -> None:
    tracing = Tracing(TelemetryConfig())
    carrier = {"traceparent": "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00-x"}
    assert tracing.start_server_span("s", carrier, {}) is None


def test_the_child_gathers_batches_into_fewer_exports() -> None:
    """Batches that arrive within the gathering time go out together; a batch on its own goes
    out once that time has passed, with the pipe still open; ``most`` caps a gathering; what
    is left goes out when the pipe ends, without waiting."""
    read, write = os.pipe()
    got: list[tuple[float, list[Any]]] = []
    wrote: dict[int, float] = {}

    def send(batch: list[Any]) -> None:
        data = pickle.dumps(batch)
        wrote[batch[0]] = time.monotonic()
        os.write(write, _HEADER.pack(len(data)) + data)

    def writer() -> None:
        send([1, 2])
        send([3])
        time.sleep(0.05)
        send([4])  # within the gathering time of [1, 2]
        time.sleep(1.2)  # [1, 2, 3, 4] goes out meanwhile
        send([5])
        time.sleep(1.2)
        send(list(range(10, 16)))  # over `most`: out at once
        time.sleep(0.05)
        send([20])
        os.close(write)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for batch in gathered(read, seconds=0.8, most=5):
            got.append((time.monotonic(), batch))
    finally:
        thread.join()
        os.close(read)
    assert [batch for _, batch in got] == [[1, 2, 3, 4], [5], [10, 11, 12, 13, 14, 15], [20]]
    at = [t for t, _ in got]
    assert at[0] >= wrote[1] + 0.8  # it waited for more
    assert at[1] >= wrote[5] + 0.8  # alone, out after the gathering time, the pipe open
    assert at[3] < wrote[20] + 0.8  # the pipe's end, not the timer
