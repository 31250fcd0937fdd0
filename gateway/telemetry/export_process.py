"""Span export in a child process: the serving process hands finished spans over a pipe.

Why: the OTLP exporter encodes spans in Python (~90 µs a span, plus the HTTP request), and
in a thread of the serving process that work holds the GIL the event loop needs. At sampling
0.1 it cost the full chain ~19% of its throughput and ~2.5 ms of p99 at 500 req/s on the
bench machine. Here the serving process records its spans as plain values
(:mod:`gateway.telemetry.spans`) and pickles a batch every ``schedule_delay`` (in a small
thread); the child rebuilds them as SDK spans and exports them with the same OTLP exporter,
on another core.

The child gathers what the serving process hands it for up to :data:`GATHER_SECONDS` (or
until :data:`MAX_EXPORT_BATCH` spans wait) and sends them in one OTLP request: the exporter's
HTTP request costs as much as encoding ~60 spans (requests' session machinery: proxies from
the environment, adapters), and the serving process hands over a batch every 0.2 s.

The child is ``python -m gateway.telemetry.export_process``, started by the serving process
(one per worker) with the telemetry section as JSON in its arguments. It ignores SIGINT and
SIGTERM and exits when its stdin closes: after the serving process's last batch at shutdown,
or when that process dies, so it never outlives it. If the child dies, spans are dropped
(one warning) and requests are not affected.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

if TYPE_CHECKING:  # the child does without the policy models (~20 MB of its RSS)
    from gateway.policy.sections import TelemetryConfig

log = logging.getLogger("gateway.tracing")

_HEADER = struct.Struct("!I")
MAX_EXPORT_BATCH = 512
"""Spans in one OTLP request at most."""
GATHER_SECONDS = 1.0
"""How long the child gathers spans before it sends them (sooner when MAX_EXPORT_BATCH wait):
a span reaches the collector at most this much (plus the serving process's 0.2 s) after it
ended; the SDK's own batch processor waits 5 s by default."""
SHUTDOWN_WAIT = 5.0
"""Seconds shutdown waits for the last batch to be handed over, then for the child to export
it (its exporter gives up on a collector after 2 s)."""
Flat = tuple[Any, ...]


def _flat_context(ctx: SpanContext | None) -> Flat | None:
    if ctx is None:
        return None
    return (
        ctx.trace_id,
        ctx.span_id,
        ctx.is_remote,
        int(ctx.trace_flags),
        ctx.trace_state.to_header(),
    )


def _context(flat: Flat | None) -> SpanContext | None:
    if flat is None:
        return None
    trace_id, span_id, remote, flags, state = flat
    trace_state = TraceState.from_header([state]) if state else TraceState()
    return SpanContext(trace_id, span_id, remote, TraceFlags(flags), trace_state)


def flatten(span: ReadableSpan) -> Flat:
    """A finished span as plain values (picklable: SDK spans hold locks)."""
    scope = span.instrumentation_scope
    return (
        span.name,
        _flat_context(span.context),
        _flat_context(span.parent),
        span.kind.value,
        span.start_time,
        span.end_time,
        dict(span.attributes or {}),
        [(e.name, dict(e.attributes or {}), e.timestamp) for e in span.events],
        [(_flat_context(lk.context), dict(lk.attributes or {})) for lk in span.links],
        span.status.status_code.value,
        span.status.description,
        (scope.name, scope.version, scope.schema_url) if scope is not None else None,
        (dict(span.resource.attributes), span.resource.schema_url),
    )


# Every span of a process has the same resource and scope: one object each, not one a span
# (building a Resource and an InstrumentationScope was ~15% of this process's CPU).
_RESOURCES: dict[Any, Resource] = {}
_SCOPES: dict[Any, InstrumentationScope] = {}
_MAX_CACHED = 64


class _SharedResource(Resource):
    """A resource whose hash is computed once: the OTLP encoder groups spans by resource,
    hashing it for every span, and a Resource's hash serialises its attributes to JSON."""

    def __init__(self, attributes: dict[str, Any], schema_url: str) -> None:
        super().__init__(attributes, schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


def _resource(attrs: dict[str, Any], schema_url: str) -> Resource:
    try:
        key = (tuple(attrs.items()), schema_url)
        found = _RESOURCES.get(key)
    except TypeError:  # a list among the values: not a key
        return Resource(attrs, schema_url)
    if found is None:
        if len(_RESOURCES) >= _MAX_CACHED:
            _RESOURCES.clear()
        found = _RESOURCES[key] = _SharedResource(attrs, schema_url)
    return found


def _scope(scope: tuple[str, str | None, str | None]) -> InstrumentationScope:
    found = _SCOPES.get(scope)
    if found is None:
        if len(_SCOPES) >= _MAX_CACHED:
            _SCOPES.clear()
        found = _SCOPES[scope] = InstrumentationScope(*scope)
    return found


def rebuild(flat: Flat) -> ReadableSpan:
    """The span :func:`flatten` was given, as the exporter reads it."""
    (name, ctx, parent, kind, start, end, attrs, events, links, code, desc, scope, res) = flat
    return ReadableSpan(
        name,
        context=_context(ctx),
        parent=_context(parent),
        resource=_resource(res[0], res[1]),
        attributes=attrs,
        events=[Event(n, a, t) for n, a, t in events],
        links=[Link(_context(c), a) for c, a in links],  # type: ignore[arg-type]
        kind=SpanKind(kind),
        status=Status(StatusCode(code), desc),
        start_time=start,
        end_time=end,
        instrumentation_scope=_scope(scope) if scope is not None else None,
    )


class ProcessSpanProcessor(SpanProcessor):
    """Batches finished spans to the export child every ``schedule_delay`` seconds."""

    def __init__(
        self, cfg: TelemetryConfig, schedule_delay: float = 0.2, max_queue_size: int = 4096
    ) -> None:
        # Imported here: the export child imports this module too, and must not create
        # metric files of its own in a multiprocess metrics directory.
        from gateway.telemetry.metrics import SPANS_DROPPED

        self._full = SPANS_DROPPED.labels("queue_full")
        self._gone = SPANS_DROPPED.labels("export_process_gone")
        self._unpicklable = SPANS_DROPPED.labels("unpicklable")
        self._delay = schedule_delay
        self._max = max_queue_size
        self._queue: collections.deque[Flat] = collections.deque(maxlen=max_queue_size)
        self._wake = threading.Condition()
        self._stopping = False
        self._broken = False
        settings = {
            "endpoint": cfg.otlp_endpoint,
            "protocol": cfg.otlp_protocol,
            "log_level": cfg.log_level,
            "priority": cfg.export_priority,
        }
        self._child = subprocess.Popen(
            [sys.executable, "-m", "gateway.telemetry.export_process", json.dumps(settings)],
            stdin=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._thread = threading.Thread(target=self._run, name="span-export", daemon=True)
        self._thread.start()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Nothing to do when a span starts."""

    def on_end(self, span: ReadableSpan) -> None:
        """Queue a finished sampled SDK span (the oldest are dropped when the queue is full)."""
        if span.context is not None and span.context.trace_flags.sampled:
            self.record(flatten(span))

    def record(self, flat: Flat) -> None:
        """Queue a finished span already flat (:class:`gateway.telemetry.spans.LeanSpan`);
        when the queue is full the oldest gives way (counted)."""
        queue = self._queue
        if len(queue) == self._max:
            self._full.inc()
        queue.append(flat)

    def _run(self) -> None:
        while True:
            with self._wake:
                if not self._stopping:
                    self._wake.wait(self._delay)
                stopping = self._stopping
            self._send()
            if stopping:
                return

    def _send(self) -> None:
        batch: list[Flat] = []
        queue = self._queue
        try:
            while queue:
                batch.append(queue.popleft())
            if not batch:
                return
            if self._broken:
                self._gone.inc(len(batch))
                return
            data = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # an attribute value pickle cannot take: drop the batch, go on
            self._unpicklable.inc(len(batch))
            log.exception("spans could not be handed to the export process; batch dropped")
            return
        stdin = self._child.stdin
        assert stdin is not None
        try:
            stdin.write(_HEADER.pack(len(data)) + data)
            stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            self._gone.inc(len(batch))
            self._broken = True
            log.warning("the span export process is gone: spans are dropped from now on")

    def shutdown(self) -> None:
        """Send what is queued, close the pipe and wait for the child to export it (bounded:
        the exporter's own 2 s timeout, then the child is killed)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=SHUTDOWN_WAIT)
        if self._thread.is_alive():
            # Still writing: the child stopped reading (a collector that hangs). Killing it
            # ends the write with EPIPE; closing the pipe under the writer could block.
            self._child.kill()
        elif self._child.stdin is not None:
            with contextlib.suppress(OSError):
                self._child.stdin.close()
        try:
            self._child.wait(timeout=SHUTDOWN_WAIT)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Hand what is queued to the child now."""
        self._send()
        return True


def _read_exact(fd: int, size: int) -> bytes:
    """``size`` bytes from ``fd`` (fewer only at its end)."""
    parts: list[bytes] = []
    while size > 0:
        part = os.read(fd, size)
        if not part:
            break
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


def _read_batch(fd: int) -> list[Flat] | None:
    """The next batch the serving process wrote to ``fd``; None at the end of the pipe."""
    head = _read_exact(fd, _HEADER.size)
    if len(head) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(head)
    data = _read_exact(fd, size)
    if len(data) < size:
        return None
    batch: list[Flat] = pickle.loads(data)
    return batch


def gathered(
    fd: int, seconds: float = GATHER_SECONDS, most: int = MAX_EXPORT_BATCH
) -> Iterator[list[Flat]]:
    """The spans of the batches read from ``fd`` (the pipe, unbuffered: ``select`` sees what
    is left to read), joined until ``seconds`` after the first of them or until ``most`` wait;
    what is left when the pipe ends."""
    pending: list[Flat] = []
    since = 0.0
    while True:
        if pending:
            wait = since + seconds - time.monotonic()
            if len(pending) >= most or wait <= 0 or not select.select([fd], [], [], wait)[0]:
                yield pending
                pending = []
                continue
        batch = _read_batch(fd)
        if batch is None:
            if pending:
                yield pending
            return
        if not pending:
            since = time.monotonic()
        pending += batch


def endpoint_set(endpoint: str | None) -> bool:
    """Whether spans go anywhere: ``telemetry.otlp_endpoint`` or an ``OTEL_EXPORTER_OTLP_*``
    endpoint variable."""
    return bool(
        endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def otlp_exporter(endpoint: str | None, protocol: str | None) -> SpanExporter | None:
    """The OTLP exporter for ``telemetry.otlp_endpoint`` / ``otlp_protocol`` (or the
    ``OTEL_EXPORTER_OTLP_*`` variables), or None when no endpoint is set anywhere."""
    if not endpoint_set(endpoint):
        return None
    protocol = protocol or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as G

        return G(endpoint=endpoint, timeout=2) if endpoint else G(timeout=2)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as H

    # A short timeout bounds how long a shutdown flush waits for a collector that is gone.
    if endpoint:
        return H(endpoint=endpoint.rstrip("/") + "/v1/traces", timeout=2)
    return H(timeout=2)


def _lower_priority(priority: str) -> None:
    # Yield the CPU to the serving process: its requests wait, these spans can.
    with contextlib.suppress(OSError, AttributeError):  # SCHED_IDLE is Linux only
        if priority == "idle":
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
    with contextlib.suppress(OSError):
        os.nice(10)


def main(argv: Sequence[str]) -> None:
    """The child: export every batch read from stdin until it closes."""
    from gateway.telemetry.logging import setup_logging

    # The serving process decides when this one ends (by closing the pipe), so that a
    # Ctrl-C or a SIGTERM sent to the whole group does not drop the last batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    settings = json.loads(argv[0])
    _lower_priority(settings.get("priority", "low"))
    setup_logging(settings["log_level"])  # the exporter's warnings as JSON, as the gateway's
    exporter = otlp_exporter(settings["endpoint"], settings["protocol"])
    if exporter is None:
        return
    try:
        for batch in gathered(sys.stdin.fileno()):
            spans = [rebuild(flat) for flat in batch]
            for i in range(0, len(spans), MAX_EXPORT_BATCH):
                exporter.export(spans[i : i + MAX_EXPORT_BATCH])
    finally:
        exporter.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
