"""Every method of the upstream proxied as raw bytes, with the gateway's policy in front.

One generic handler answers any ``/package.Service/Method`` with a stream-stream handler
without (de)serializers: a unary call is a stream of one message each way, so the same code
carries unary, server-streaming, client-streaming and bidirectional calls, and no ``.proto``
is needed. For each call:

1. request id, trace context (``traceparent`` metadata) and the peer's address;
2. the route's identity and limit stages (see ``policy``); a refusal ends the call here;
3. the upstream call, with the client's metadata (minus reserved and identity keys), the
   verified identity, ``x-request-id``, ``x-forwarded-for`` and ``traceparent``, and the
   client's deadline (capped by ``grpc.timeout``);
4. the upstream's initial metadata, messages, status code, details and trailing metadata
   passed back unchanged. A client that cancels (or whose deadline passes) cancels the
   upstream call; an upstream that ends a call with ``CANCELLED`` ends the client's so.
   (grpcio's server ends a cancelled client's message stream as if it had half-closed, a
   moment before it cancels the handler: the upstream may see the end of input just before
   the cancel, as it would from that client directly.)

Failures of the hop itself get the gateway's words, not grpc's (which name addresses):
upstream unreachable or gone mid-call → ``UNAVAILABLE`` "the upstream is unavailable".
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from opentelemetry.trace import SpanKind, Status, StatusCode

from gateway.context import RequestContext
from gateway.grpcproxy.metrics import CODE_NAMES, MethodMetrics
from gateway.grpcproxy.policy import (
    Metadata,
    answer_metadata,
    client_metadata,
    metadata_value,
    refusal,
    stages,
)
from gateway.grpcproxy.upstream import UpstreamChannel
from gateway.headers import request_id_from
from gateway.pipeline import Pipeline, run_stages
from gateway.policy.sections import GrpcConfig
from gateway.telemetry import metrics
from gateway.telemetry.tracing import Tracing, light_context, traceparent

log = logging.getLogger("gateway.grpc")
access = logging.getLogger("gateway.access")

Context = grpc.aio.ServicerContext[bytes, bytes]
NO_DEADLINE = 1e7
"""``time_remaining()`` above this many seconds means the client set no deadline."""
HEALTH_PREFIX = "/grpc.health.v1.Health/"
_PEER = re.compile(r"^ipv[46]:\[?([^\]]*?)\]?:\d+$")
# grpc's own texts for a broken hop (they name addresses); an upstream's own UNAVAILABLE
# details do not look like these and pass unchanged.
_LOCAL_FAILURE = re.compile(
    r"failed to connect to all addresses|connections to all backends failing|socket closed|"
    r"connection reset|broken pipe|recvmsg|sendmsg|goaway|rst_stream|endpoint closing|"
    r"connection refused|handshake failed",
    re.IGNORECASE,
)
UNAVAILABLE_TEXT = "the upstream is unavailable"


def peer_address(peer: str) -> str:
    """The IP of grpc's peer string (``ipv4:10.0.0.1:5000``, ``ipv6:[::1]:5000``)."""
    m = _PEER.match(peer)
    return m.group(1) if m else "0.0.0.0"


class Proxy:
    """The per-call work; the pipeline (stages, store) is read at each call, so a policy
    reload applies to new calls at once."""

    def __init__(
        self,
        cfg: GrpcConfig,
        current: Callable[[], Pipeline],
        upstream: UpstreamChannel,
        tracing: Tracing | None,
        access_log: bool,
    ) -> None:
        self.cfg = cfg
        self.current = current
        self.upstream = upstream
        self.tracing = tracing
        self.access_log = access_log
        self.metrics = MethodMetrics()
        self.inflight = 0

    async def handle(self, method: str, requests: AsyncIterator[bytes], context: Context) -> None:
        """Proxy one call (any kind); records its metrics and log line however it ends."""
        started = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN
        ctx: RequestContext | None = None
        self.inflight += 1
        try:
            pipeline = self.current()
            ctx = self._context(pipeline, method, context)
            code = await self._call(pipeline, ctx, method, requests, context)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED  # the client cancelled or its deadline passed
            raise
        except Exception:
            if context.cancelled():
                # The client left while we wrote to it: not an error of ours.
                code = grpc.StatusCode.CANCELLED
            else:
                log.exception("unhandled error in a gRPC call", extra={"method": method})
                code = grpc.StatusCode.INTERNAL
                context.set_code(code)
                context.set_details("the gateway failed to handle the call")
        finally:
            self.inflight -= 1
            try:
                self._finish(ctx, method, code, time.perf_counter() - started)
            except Exception:
                log.exception("recording a gRPC call failed")

    def _context(self, pipeline: Pipeline, method: str, context: Context) -> RequestContext:
        headers: list[tuple[bytes, bytes]] = []
        carrier: dict[str, str] = {}
        rid: bytes | None = None
        xff: list[bytes] = []
        for key, value in context.invocation_metadata() or ():
            if not isinstance(value, str):
                continue  # binary metadata: no stage reads it
            raw = value.encode("latin-1", "replace")
            headers.append((key.encode("latin-1", "replace"), raw))
            if key == "x-request-id":
                rid = raw
            elif key == "traceparent" or key == "tracestate":
                carrier[key] = value
            elif key == "x-forwarded-for":
                xff.append(raw)
        peer = peer_address(context.peer())
        client_ip = pipeline.client_ip.resolve(peer, xff) if xff else peer
        route = pipeline.router.match("POST", method)
        ctx = RequestContext(
            {"type": "grpc", "peer": peer, "xff": xff},
            request_id_from(rid),
            route,
            "POST",
            method,
            client_ip,
            headers,
        )
        self._start_trace(ctx, carrier, peer)
        return ctx

    def _start_trace(self, ctx: RequestContext, carrier: dict[str, str], peer: str) -> None:
        tracing = self.tracing
        span = None
        if tracing is not None and tracing.records(carrier.get("traceparent")):
            service, name = self.metrics.labels(ctx.path)
            span = tracing.start_server_span(
                ctx.path.lstrip("/"),
                carrier,
                {
                    "rpc.system": "grpc",
                    "rpc.service": service,
                    "rpc.method": name,
                    "client.address": ctx.client_ip,
                    "network.peer.address": peer,
                    "gateway.request_id": ctx.request_id,
                },
            )
        if span is None:  # not sampled (ratio or the client's flag), or not exporting
            tid, sid, flags = light_context(carrier.get("traceparent"))
            ctx.trace_id, ctx.span_id = tid, sid
            ctx.traceparent = f"00-{tid}-{sid}-{flags}"
            return
        ctx.span = span
        ctx.trace_id, ctx.span_id = f"{span.trace_id:032x}", f"{span.span_id:016x}"
        ctx.traceparent = traceparent(span)

    def _upstream_metadata(self, pipeline: Pipeline, ctx: RequestContext, md: Any) -> Metadata:
        out = client_metadata(tuple(md or ()), pipeline.strip_headers)
        for key, value in ctx.upstream_headers:
            out.append((key.decode("latin-1"), metadata_value(value)))
        peer: str = ctx.scope["peer"]
        xff: list[bytes] = ctx.scope["xff"]
        if xff and pipeline.client_ip.enabled and pipeline.client_ip.is_trusted(peer):
            chain = ", ".join(metadata_value(v) for v in xff)
            out.append(("x-forwarded-for", f"{chain}, {peer}"))
        else:
            out.append(("x-forwarded-for", peer))
        out.append(("x-request-id", ctx.request_id))
        return out

    def _timeout(self, context: Context) -> float | None:
        left = context.time_remaining()
        timeout = None if left is None or left > NO_DEADLINE else max(left, 0.001)
        cap = self.cfg.timeout
        if cap is not None:
            timeout = cap if timeout is None else min(timeout, cap)
        return timeout

    async def _call(
        self,
        pipeline: Pipeline,
        ctx: RequestContext,
        method: str,
        requests: AsyncIterator[bytes],
        context: Context,
    ) -> grpc.StatusCode:
        ours: Metadata = [("x-request-id", ctx.request_id)]
        deny = await run_stages(stages(ctx.route), ctx, self.tracing)
        if deny is not None:
            metrics.REQUEST_ERRORS.labels(deny.type).inc()
            code, details, trailing = refusal(deny, ctx.response_headers)
            context.set_trailing_metadata(tuple([*trailing, *ours]))
            context.set_code(code)
            context.set_details(details)
            return code
        md = self._upstream_metadata(pipeline, ctx, context.invocation_metadata())
        tracing, span = self.tracing, ctx.span
        upstream_span = None
        if tracing is not None and span is not None and span.is_recording():
            upstream_span = tracing.start_child("upstream", span, SpanKind.CLIENT)
            md.append(("traceparent", traceparent(upstream_span)))
        elif ctx.traceparent is not None:
            md.append(("traceparent", ctx.traceparent))
        if ctx.traceparent is not None:
            ours.append(("traceparent", ctx.traceparent))
        try:
            return await self._relay(method, requests, context, md, ours)
        finally:
            if upstream_span is not None:
                upstream_span.end()

    async def _relay(
        self,
        method: str,
        requests: AsyncIterator[bytes],
        context: Context,
        md: Metadata,
        ours: Metadata,
    ) -> grpc.StatusCode:
        it = aiter(requests)
        opening = await _opening(it)
        timeout = self._timeout(context)
        call: grpc.aio.Call
        try:
            if isinstance(opening, bytes):
                # One message and the half-close: sent upstream in one batch, so an upstream
                # that answers at once (UNIMPLEMENTED, its own auth) cannot race our write
                # (grpc would report that race as INTERNAL instead of the upstream's status).
                call = self.upstream.unary_method(method)(
                    opening, metadata=tuple(md), timeout=timeout
                )
            else:
                call = self.upstream.method(method)(
                    _forward(it, opening), metadata=tuple(md), timeout=timeout
                )
        except (ValueError, TypeError):
            # grpc refuses metadata it cannot send (bad key or value): the client's fault.
            if isinstance(opening, _Opening):
                opening.cancel()
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            context.set_details("metadata that cannot be forwarded")
            return grpc.StatusCode.INVALID_ARGUMENT
        answers: AsyncIterator[bytes] = call  # type: ignore[assignment]
        try:
            initial = await call.initial_metadata()
            await context.send_initial_metadata(tuple([*answer_metadata(initial), *ours]))
            async for message in answers:
                await context.write(message)
        except grpc.aio.AioRpcError:
            pass  # the status is read below, from the call
        finally:
            if not call.done():
                call.cancel()  # the client left (cancelled, deadline) or writing failed
            if isinstance(opening, _Opening):
                opening.cancel()
        code = await call.code()
        details = await call.details()
        trailing = answer_metadata(await call.trailing_metadata())
        if code == grpc.StatusCode.UNAVAILABLE and details and _LOCAL_FAILURE.search(details):
            metrics.UPSTREAM_ERRORS.labels("refused").inc()
            details = UNAVAILABLE_TEXT
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            metrics.UPSTREAM_ERRORS.labels("timeout").inc()
        context.set_trailing_metadata(tuple(trailing))
        if code != grpc.StatusCode.OK:
            context.set_code(code)
            context.set_details(details or "")
        return code

    def _finish(
        self, ctx: RequestContext | None, method: str, code: grpc.StatusCode, elapsed: float
    ) -> None:
        self.metrics.record(method, code, elapsed)
        if ctx is None:
            return
        span = ctx.span
        if span is not None:
            if span.is_recording():
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
                    span.set_status(Status(StatusCode.ERROR))
            span.end()
        if self.access_log and access.isEnabledFor(logging.INFO):
            fields: dict[str, Any] = {
                "request_id": ctx.request_id,
                "trace_id": ctx.trace_id,
                "span_id": ctx.span_id,
                "method": "grpc",
                "route": ctx.route.name,
                "path": method,
                "grpc_code": CODE_NAMES[code],
                "duration_ms": round(elapsed * 1000, 3),
                "client_ip": ctx.client_ip,
                "user": ctx.identity.sub if ctx.identity else None,
                "tier": ctx.identity.tier if ctx.identity else "anonymous",
            }
            fields.update(ctx.notes)
            access.info("grpc call", extra=fields)


UNARY_WINDOW = 0.002
"""How long to wait for a call's first message and the client's half-close before calling
upstream: a unary request brings both at once; a streaming client is only delayed this long
once (and a client that waits for the service to speak first is not waited for)."""


class _Opening:
    """The start of a client stream that is not one message and a half-close: the first
    message when it came within the window, and the read still pending, if any."""

    __slots__ = ("first", "pending")

    def __init__(self, first: bytes | None, pending: asyncio.Future[bytes] | None) -> None:
        self.first = first
        self.pending = pending

    def cancel(self) -> None:
        """Drop the pending read (the call is over)."""
        if self.pending is not None and not self.pending.done():
            self.pending.cancel()


def _seen(future: asyncio.Future[bytes]) -> None:
    # The read may end (end of stream, failed read) after the call is over and nobody
    # awaits it any more: take its outcome so asyncio does not log it as lost.
    if not future.cancelled():
        future.exception()


def _read(it: AsyncIterator[bytes]) -> asyncio.Future[bytes]:
    future = asyncio.ensure_future(anext(it))
    future.add_done_callback(_seen)
    return future


async def _opening(it: AsyncIterator[bytes]) -> bytes | _Opening:
    """The single message of a unary request, or the opening of a stream."""
    deadline = time.monotonic() + UNARY_WINDOW
    read = _read(it)
    done, _ = await asyncio.wait({read}, timeout=UNARY_WINDOW)
    if not done:
        return _Opening(None, read)  # nothing yet: maybe the service is to speak first
    if isinstance(read.exception(), StopAsyncIteration):
        return _Opening(None, None)
    first = read.result()
    read = _read(it)
    done, _ = await asyncio.wait({read}, timeout=max(0.0, deadline - time.monotonic()))
    if done and isinstance(read.exception(), StopAsyncIteration):
        return first
    return _Opening(first, read)


async def _forward(it: AsyncIterator[bytes], opening: _Opening) -> AsyncIterator[bytes]:
    """The client's messages for the upstream call, the opening first."""
    if opening.first is not None:
        yield opening.first
    if opening.pending is not None:
        try:
            yield await opening.pending
        except StopAsyncIteration:
            return
        async for message in it:
            yield message


class ProxyHandler(grpc.GenericRpcHandler):
    """Hands every method (but the gateway's own health service) to :class:`Proxy`."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """A raw-bytes stream-stream handler bound to the called method."""
        method: str = handler_call_details.method
        if method.startswith(HEALTH_PREFIX):
            return None  # answered by the health service registered before this handler
        return grpc.stream_stream_rpc_method_handler(functools.partial(self.proxy.handle, method))
