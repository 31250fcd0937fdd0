"""Load shedding: the answer for a request over ``max_in_flight``."""

from __future__ import annotations

from gateway.asgi import Scope, Send, send_simple
from gateway.errors import Deny, error_response
from gateway.headers import request_id_from
from gateway.telemetry import metrics

_SHED = Deny(
    503,
    "overloaded",
    "the gateway is handling as many requests as it may; retry later",
    ((b"retry-after", b"1"),),
)


async def shed(scope: Scope, send: Send) -> None:
    """Answer 503 ``overloaded`` with ``Retry-After: 1`` without running any stage."""
    rid = None
    for k, v in scope["headers"]:
        if k == b"x-request-id":
            rid = v
            break
    metrics.REQUEST_ERRORS.labels("overloaded").inc()
    status, headers, body = error_response(_SHED, request_id_from(rid))
    await send_simple(send, status, headers, body)
