"""The HTTP side's policy applied to gRPC calls: metadata in and out, stages, status mapping.

* A call is matched to a route by its path (``/package.Service/Method``) as an HTTP ``POST``,
  so a route ``path: /echo.Echo/`` gives that service its own ``auth``/``rate_limits``; the
  top-level sections apply otherwise.
* It meets the route's identity and limit stages (JWT from the ``authorization`` metadata,
  per-peer (``per_ip``), per-tier and per-route limits). Token and cost budgets and the
  guardrails read JSON bodies, which protobuf messages are not: they do not apply to gRPC.
* A stage's refusal becomes a gRPC status (``STATUS``); a wait (``Retry-After``) becomes a
  ``google.rpc.RetryInfo`` in ``grpc-status-details-bin`` and a ``retry-after`` key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from gateway.errors import Deny
from gateway.headers import HOP_BY_HOP
from gateway.pipeline import RequestStage
from gateway.routes import CompiledRoute

Metadata = list[tuple[str, str | bytes]]

STATUS: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    431: grpc.StatusCode.RESOURCE_EXHAUSTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
"""HTTP status of a refusal → gRPC status code (the mapping of the gRPC HTTP spec, with
429 as ``RESOURCE_EXHAUSTED``); anything else is ``INTERNAL``."""

GRPC_STAGES = frozenset({"auth", "ratelimit"})
"""Stages that apply to gRPC calls (the others read JSON bodies)."""

#: Keys of the client's metadata never sent upstream: transport keys grpc sets itself,
#: hop-by-hop ones, and the keys the gateway sets (a client must not choose its request id,
#: address or trace parent for the upstream other than through the gateway's own handling).
RESERVED = frozenset(
    {
        *(k.decode() for k in HOP_BY_HOP),
        "host",
        "user-agent",
        "content-type",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "forwarded",
        "x-request-id",
        "traceparent",
        "tracestate",
    }
)
#: Keys of the upstream's answer never passed back (grpc owns them).
RESERVED_ANSWER = frozenset({*(k.decode() for k in HOP_BY_HOP), "content-type", "user-agent"})
_VALUE = re.compile(r"^[\x20-\x7e]*$")


def stages(route: CompiledRoute) -> list[RequestStage]:
    """The route's stages that apply to gRPC, in phase order."""
    if not route.after_body:
        return route.before_body
    extra = [s for s in route.after_body if s.name in GRPC_STAGES]
    return sorted([*route.before_body, *extra], key=lambda s: s.phase)


def client_metadata(md: tuple[tuple[str, str | bytes], ...], strip: frozenset[bytes]) -> Metadata:
    """The client's metadata to forward: without reserved, ``grpc-*`` and identity keys
    (``strip``: the identity names in all their spellings)."""
    out: Metadata = []
    for key, value in md:
        if key in RESERVED or key.startswith(("grpc-", ":", "proxy-")):
            continue
        if key.encode() in strip:
            continue
        out.append((key, value))
    return out


def answer_metadata(md: Iterable[tuple[str, str | bytes]] | None) -> Metadata:
    """The upstream's initial or trailing metadata to pass back, minus grpc's own keys;
    ``grpc-status-details-bin`` (the rich status) is passed unchanged."""
    out: Metadata = []
    for key, value in md or ():
        if key in RESERVED_ANSWER or key.startswith(":"):
            continue
        if key.startswith("grpc-") and key != "grpc-status-details-bin":
            continue
        out.append((key, value))
    return out


def metadata_value(raw: bytes) -> str:
    """A value the gateway adds (identity) as valid text metadata: printable ASCII as is,
    other bytes and ``%`` percent-encoded (a JWT ``sub`` may be any Unicode)."""
    text = raw.decode("latin-1")
    if _VALUE.match(text) and "%" not in text:
        return text
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in raw)


def refusal(deny: Deny, extra: list[tuple[bytes, bytes]]) -> tuple[grpc.StatusCode, str, Metadata]:
    """Status code, details and trailing metadata for a stage's refusal.

    ``extra`` are the headers stages added to the answer (``RateLimit-*``)."""
    code = STATUS.get(deny.status, grpc.StatusCode.INTERNAL)
    trailing: Metadata = [("x-gateway-error", deny.type)]
    retry: int | None = None
    for key, value in (*extra, *deny.headers):
        name = key.decode("latin-1").lower()
        if name == "retry-after" and value.isdigit():
            retry = int(value)
        if name.startswith("ratelimit-") or name in ("retry-after", "www-authenticate"):
            trailing.append((name, metadata_value(value)))
    if retry is not None:
        info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=retry))
        detail = any_pb2.Any()
        detail.Pack(info)
        rich = status_pb2.Status(code=code.value[0], message=deny.message, details=[detail])
        trailing.append(("grpc-status-details-bin", rich.SerializeToString()))
    return code, deny.message, trailing
