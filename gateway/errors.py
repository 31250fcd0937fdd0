"""The one error shape clients see, and the exception tree of the gateway.

``{"error": {"type": "rate_limited", "message": "...", "request_id": "..."}}``
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True, frozen=True)
class Deny:
    """A stage's decision to stop the request with this answer; nobody re-checks it."""

    status: int
    type: str
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = field(default=())
    scope: str | None = None
    """What was exceeded, for limits: ``ip``, ``tier``, ``route``, ``tokens`` or ``budget``."""


class GatewayError(Exception):
    """Base of the errors the gateway turns into a :class:`Deny` answer."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def deny(self) -> Deny:
        """The client-facing answer for this error."""
        return Deny(self.status, self.type, self.message)


class BodyTooLarge(GatewayError):
    """The request body is larger than ``max_body_bytes``."""

    status = 413
    type = "body_too_large"


class UpstreamError(GatewayError):
    """The upstream could not be reached or did not answer in time."""

    def __init__(self, status: int, type_: str, message: str, kind: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        #: Closed set used as a metric label: refused, connect_timeout, timeout, reset, protocol.
        self.kind = kind


def error_body(
    type_: str,
    message: str,
    request_id: str,
    trace_id: str | None = None,
    scope: str | None = None,
) -> bytes:
    """Serialise the error shape; messages are ours, never a library's or the client's input.
    ``scope`` (limits only) names what was exceeded."""
    error = {"type": type_, "message": message, "request_id": request_id}
    if scope is not None:
        error["scope"] = scope
    if trace_id is not None:
        error["trace_id"] = trace_id
    return json.dumps({"error": error}, separators=(",", ":")).encode()


def error_response(
    deny: Deny, request_id: str, extra: Headers | None = None, trace_id: str | None = None
) -> tuple[int, Headers, bytes]:
    """Status, headers and body of the JSON error answer for ``deny``."""
    body = error_body(deny.type, deny.message, request_id, trace_id, deny.scope)
    headers: Headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
        *deny.headers,
    ]
    if extra:
        headers.extend(extra)
    return deny.status, headers, body
