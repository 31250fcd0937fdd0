"""RequestContext: everything one request carries through the pipeline."""

from __future__ import annotations

import copy
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.llm.usage import decode_json

if TYPE_CHECKING:
    from gateway.routes import CompiledRoute
    from gateway.telemetry.spans import LeanSpan

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Identity:
    """The verified caller."""

    sub: str
    tier: str
    claims: dict[str, Any]


@dataclass(slots=True)
class Usage:
    """LLM usage of one request, when known."""

    model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    estimated: bool = False


@dataclass(slots=True)
class RequestContext:
    """Per-request state. Stages keep nothing per request on ``self``; it all lives here."""

    scope: MutableMapping[str, Any]
    request_id: str
    route: CompiledRoute
    method: str
    path: str
    client_ip: str
    headers: Headers
    """Request headers as received (lower-case names)."""
    started: float = field(default_factory=time.perf_counter)
    ended: float = 0.0
    """When the handler returned (``perf_counter``; 0 until then): the request's duration ends
    here, though it is recorded a moment later (see :class:`gateway.app.GatewayApp`)."""
    ended_ns: int = 0
    """The same instant as wall-clock nanoseconds, for the server span's end (0: now)."""
    identity: Identity | None = None
    body: bytes | None = None
    """The request body, present only when a stage asked for it (``needs_body``)."""
    upstream_headers: Headers = field(default_factory=list)
    """Extra headers stages add to the upstream request (e.g. verified identity)."""
    response_headers: Headers = field(default_factory=list)
    """Extra headers stages add to the client's response (e.g. RateLimit-*)."""
    usage: Usage = field(default_factory=Usage)
    status: int = 0
    notes: dict[str, Any] = field(default_factory=dict)
    """Outcomes of stages for logs and metrics (``{"guardrail": "block", ...}``)."""
    span: LeanSpan | None = None
    """The request's server span, the parent of stage and upstream spans (None when this
    request is not recorded)."""
    trace_id: str | None = None
    span_id: str | None = None
    traceparent: str | None = None
    """Our ``traceparent`` (sent upstream and returned), when no span is recorded."""
    prompt_texts: list[str] | None = None
    """The prompt fields the input guardrail read (for the opt-in prompt log only)."""
    ahead: dict[str, Any] | None = None
    """What stages prepared ahead of their turn, by stage name, while their stage list runs
    (see :func:`gateway.pipeline.run_stages`); None otherwise."""
    upstream_seconds: float | None = None
    """Time to the upstream's response headers."""
    upstream_waited: float = 0.0
    """Seconds from sending the upstream request to the last byte of its answer (0: the
    upstream did not answer completely): what ``gateway_added_latency_seconds`` subtracts."""
    _doc_of: bytes | None = None
    _doc: Any = None
    _doc_error: Exception | None = None

    def json_body(self) -> Any:
        """``body`` decoded as JSON, decoded once however many stages read it (the limit
        stage's estimate, the input guardrail). Raises what ``json.loads`` raises. A stage that
        rewrites ``body`` sets new bytes, so the next reader decodes those."""
        body = self.body or b""
        if self._doc_of is not body:
            self._doc_of = body
            try:
                self._doc, self._doc_error = decode_json(body), None
            except (ValueError, RecursionError) as exc:
                # Kept and raised as copies, without traceback or context: those hold frames
                # that hold this context, a cycle left to the garbage collector.
                self._doc, self._doc_error = None, copy.copy(exc)
        if self._doc_error is not None:
            raise copy.copy(self._doc_error)
        return self._doc

    def decoded_body(self, default: Any) -> Any:
        """What :meth:`json_body` decoded from the current ``body``, or ``default`` when no
        stage has decoded it (or it is not JSON): for a reader that can do without."""
        body = self.body
        if body is not None and self._doc_of is body and self._doc_error is None:
            return self._doc
        return default

    def header(self, name: bytes) -> bytes | None:
        """First value of request header ``name`` (lower-case), or None."""
        for k, v in self.headers:
            if k == name:
                return v
        return None
