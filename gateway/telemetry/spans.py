"""The gateway's spans, recorded as plain values instead of OpenTelemetry SDK span objects.

Why: a sampled request's server and upstream spans cost ~150 µs in the SDK (context objects,
the sampler, a lock and attribute validation per call, the processor chain), and flattening
them for the export process cost ~60 µs a span more. Under load, tracing at sampling 0.1 cost
the full chain ~90 µs a request and two workers a third of their throughput (README, speed).

The gateway only records spans it starts itself, with attributes of its own, so a span here
is a small object whose :meth:`LeanSpan.end` hands the export process the flat tuple it reads
(the format of :func:`gateway.telemetry.export_process.flatten`). The export process still
rebuilds SDK spans and exports them with the official OTLP exporter, and a test holds the
encoding to the SDK's own for the same spans. Ids, flags and trace state follow the SDK
with a parent-based always-on sampler: ids from ``random.getrandbits`` (never zero), the
sampled and random-trace-id flags, the parent's ``tracestate``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode

Flat = tuple[Any, ...]
"""A finished span as plain values (:func:`gateway.telemetry.export_process.rebuild`)."""
FlatContext = tuple[int, int, bool, int, str]
"""(trace id, span id, remote, flags, ``tracestate`` header) of a span or its parent."""
Sink = Callable[[Flat], None]
"""Where a span goes when it ends."""

_SAMPLED = 0x01
_RANDOM_TRACE_ID = 0x02  # W3C trace context level 2, set by the SDK's random id generator


class SpanOwner:
    """What every span of a process shares: where it goes, its resource and scope."""

    __slots__ = ("resource", "scope", "sink")

    def __init__(
        self, sink: Sink, resource: tuple[dict[str, Any], str | None], scope: Flat
    ) -> None:
        self.sink = sink
        self.resource = resource
        self.scope = scope

    def root(
        self,
        name: str,
        parent: FlatContext | None,
        kind: SpanKind,
        attributes: dict[str, Any] | None,
    ) -> LeanSpan:
        """A span under a remote ``parent`` (a client's sampled ``traceparent``) or, without
        one, the root of a new trace."""
        if parent is None:
            trace_id = random.getrandbits(128) or 1
            flags, state = _SAMPLED | _RANDOM_TRACE_ID, ""
        else:
            trace_id, state = parent[0], parent[4]
            flags = _SAMPLED | (parent[3] & _RANDOM_TRACE_ID)
        return LeanSpan(self, name, trace_id, flags, state, parent, kind, attributes)


class LeanSpan:
    """A recorded span: the subset of the SDK's ``Span`` the gateway uses."""

    __slots__ = (
        "_end",
        "_owner",
        "attributes",
        "description",
        "flags",
        "kind",
        "name",
        "parent",
        "span_id",
        "start",
        "state",
        "status",
        "trace_id",
    )

    def __init__(
        self,
        owner: SpanOwner,
        name: str,
        trace_id: int,
        flags: int,
        state: str,
        parent: FlatContext | None,
        kind: SpanKind,
        attributes: dict[str, Any] | None,
    ) -> None:
        self._owner = owner
        self.name = name
        self.trace_id = trace_id
        self.span_id = random.getrandbits(64) or 1
        self.flags = flags
        self.state = state
        self.parent = parent
        self.kind = kind
        self.attributes: dict[str, Any] = dict(attributes) if attributes else {}
        self.status = StatusCode.UNSET
        self.description: str | None = None
        self.start = time.time_ns()
        self._end: int | None = None

    def is_recording(self) -> bool:
        """True until the span ends."""
        return self._end is None

    def set_attribute(self, key: str, value: Any) -> None:
        """Set an attribute (ignored once the span has ended)."""
        if self._end is None:
            self.attributes[key] = value

    def set_status(self, status: Status) -> None:
        """Set the status as the SDK does: UNSET is ignored, OK is final."""
        if self._end is not None or status.status_code is StatusCode.UNSET:
            return
        if self.status is not StatusCode.OK:
            self.status, self.description = status.status_code, status.description

    def child(self, name: str, kind: SpanKind = SpanKind.INTERNAL) -> LeanSpan:
        """A span under this one (a stage, the upstream call)."""
        here = (self.trace_id, self.span_id, False, self.flags, self.state)
        return LeanSpan(self._owner, name, self.trace_id, self.flags, self.state, here, kind, None)

    def traceparent(self) -> str:
        """The W3C ``traceparent`` header value for this span."""
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{self.flags:02x}"

    def end(self, end_time: int | None = None) -> None:
        """End the span (at ``end_time`` ns since the epoch, default now) and hand it to the
        export process (a second call does nothing)."""
        if self._end is not None:
            return
        self._end = end = time.time_ns() if end_time is None else end_time
        owner = self._owner
        owner.sink(
            (
                self.name,
                (self.trace_id, self.span_id, False, self.flags, self.state),
                self.parent,
                self.kind.value,
                self.start,
                end,
                self.attributes,
                [],
                [],
                self.status.value,
                self.description,
                owner.scope,
                owner.resource,
            )
        )
