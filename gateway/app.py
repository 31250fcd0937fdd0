"""The proxy ASGI app: request id, route, stages, upstream, response stages; swappable pipeline."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from opentelemetry.trace import SpanKind
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from gateway import heap
from gateway.asgi import Message, Receive, Scope, Send, send_simple
from gateway.context import RequestContext
from gateway.errors import BodyTooLarge, Deny, GatewayError, Headers, UpstreamError, error_response
from gateway.headers import (
    GATEWAY_SET,
    connection_tokens,
    has_header,
    is_hop_by_hop,
    request_id_from,
)
from gateway.headers import response_headers as clean_response_headers
from gateway.overload import shed
from gateway.pipeline import BodyFilter, Pipeline, ResponseHead, run_stages
from gateway.response_head import write_head
from gateway.telemetry import metrics
from gateway.telemetry.spans import LeanSpan
from gateway.telemetry.tracing import Tracing, light_context, traceparent
from gateway.upstream import UpstreamResponse

log = logging.getLogger("gateway.proxy")

#: Declared-length answers up to this size are read whole and sent in one write.
SMALL_BODY = 64 * 1024
#: Declared-length request bodies up to this size are read whole before going upstream.
SMALL_REQUEST_BODY = 64 * 1024
#: Buffering response filters (JSON guardrails) read at most this much of an answer.
MAX_BUFFERED_RESPONSE = 16 * 1024 * 1024


class GatewayApp:
    """The client-facing ASGI app. ``pipeline`` is replaced whole on reload; a request keeps
    the pipeline it started with until it ends."""

    def __init__(self, pipeline: Pipeline, tracing: Tracing | None = None) -> None:
        self.pipeline = pipeline
        self.tracing = tracing
        self.inflight = 0
        """Requests being handled, across pipelines (read by the in-flight gauge at scrape)."""
        self._retired: set[Pipeline] = set()

    def swap(self, new: Pipeline) -> Pipeline:
        """Make ``new`` the pipeline for new requests; the old one closes when idle."""
        old, self.pipeline = self.pipeline, new
        old.retired = True
        if old.inflight == 0:
            self._close_later(old)
        else:
            self._retired.add(old)
        return old

    def _close_later(self, pipeline: Pipeline) -> None:
        self._retired.discard(pipeline)
        loop = asyncio.get_running_loop()
        task = loop.create_task(pipeline.close())

        def closed(t: asyncio.Task[None]) -> None:
            if not t.cancelled():
                t.exception()
            loop.call_soon(heap.refreeze)  # once the task has let go of the pipeline

        task.add_done_callback(closed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off and websockets are not proxied (ws="none")
        pipeline = self.pipeline
        if self.inflight >= pipeline.policy.max_in_flight:
            return await shed(scope, send)  # before any work: shedding must stay cheap
        pipeline.inflight += 1
        self.inflight += 1
        state = _State()
        try:
            await _handle(pipeline, self.tracing, scope, receive, _tracking(send, state), state)
        except Exception:
            log.exception("unhandled error", extra={"path": scope.get("path")})
            if not state.started:
                ctx = state.ctx
                rid = ctx.request_id if ctx else request_id_from(None)
                deny = Deny(500, "internal_error", "the gateway failed to handle the request")
                if ctx is not None:
                    ctx.status = 500
                status, headers, body = error_response(deny, rid, trace_id=_tid(ctx))
                await send_simple(send, status, headers, body)
        finally:
            ctx = state.ctx
            if ctx is None:
                self._done(pipeline)
            else:
                ctx.ended = time.perf_counter()
                if ctx.span is not None:
                    ctx.ended_ns = time.time_ns()
                # The answer's bytes leave at the end of this loop turn (the corked transport's
                # flush is already queued); the bookkeeping queued after it does not delay them.
                asyncio.get_running_loop().call_soon(self._record, pipeline, ctx)

    def _record(self, pipeline: Pipeline, ctx: RequestContext) -> None:
        """Finishers, metrics, span and access log of one request, after its answer left."""
        try:
            for stage in ctx.route.finishers:
                stage.on_finish(ctx)
            pipeline.recorder.finish(ctx)
        except Exception:
            log.exception("recording a request failed")
        self._done(pipeline)

    def _done(self, pipeline: Pipeline) -> None:
        # Still in flight until recorded: a retired pipeline (and its store) closes after.
        self.inflight -= 1
        pipeline.inflight -= 1
        if pipeline.retired and pipeline.inflight == 0 and pipeline in self._retired:
            self._close_later(pipeline)


class _State:
    __slots__ = ("ctx", "started")

    def __init__(self) -> None:
        self.started = False
        self.ctx: RequestContext | None = None


def _tid(ctx: RequestContext | None) -> str | None:
    return ctx.trace_id if ctx is not None else None


def _tracking(send: Send, state: _State) -> Send:
    cycle = getattr(send, "__self__", None)
    if type(cycle) is RequestResponseCycle:
        # uvicorn's own cycle: a plain head is written in bulk (gateway.response_head)
        assert cycle is not None

        async def lean(message: Message) -> None:
            if message["type"] == "http.response.start":
                state.started = True
                if write_head(cycle, message):
                    return
            await send(message)

        return lean

    async def tracked(message: Message) -> None:
        if message["type"] == "http.response.start":
            state.started = True
        await send(message)

    return tracked


async def _deny(send: Send, ctx: RequestContext, deny: Deny) -> None:
    metrics.REQUEST_ERRORS.labels(deny.type).inc()
    ctx.status = deny.status
    status, headers, body = error_response(
        deny, ctx.request_id, ctx.response_headers, trace_id=ctx.trace_id
    )
    await send_simple(send, status, headers, body)


def _bad_path(path: str) -> bool:
    # Routes are matched on the decoded path; dot segments or a NUL would let a client match
    # one route (a public one) while the upstream normalises to another (a protected one).
    if not path.startswith("/") or "\x00" in path or "\\" in path:
        return True
    return "/." in path and any(seg in (".", "..") for seg in path.split("/"))


async def _handle(
    pipeline: Pipeline,
    tracing: Tracing | None,
    scope: Scope,
    receive: Receive,
    send: Send,
    state: _State,
) -> None:
    raw_headers: Headers = scope["headers"]
    rid_raw = clen_raw = host = None
    chunked = False
    size = 0
    xff: list[bytes] = []
    carrier: dict[str, str] = {}
    for k, v in raw_headers:
        size += len(k) + len(v) + 4
        if k == b"x-request-id":
            rid_raw = v
        elif k == b"content-length":
            clen_raw = v
        elif k == b"transfer-encoding":
            chunked = True
        elif k == b"host":
            host = v
        elif k == b"x-forwarded-for":
            xff.append(v)
        elif k == b"traceparent" or k == b"tracestate":
            carrier[k.decode()] = v.decode("latin-1")
    method: str = scope["method"]
    path: str = scope["path"]
    route = pipeline.router.match(method, path.replace("//", "/") if "//" in path else path)
    client = scope.get("client")
    peer = client[0] if client else "0.0.0.0"
    client_ip = pipeline.client_ip.resolve(peer, xff) if xff else peer
    ctx = RequestContext(
        scope, request_id_from(rid_raw), route, method, path, client_ip, raw_headers
    )
    state.ctx = ctx
    if tracing is not None:
        _start_trace(tracing, ctx, carrier, peer)
    if size > pipeline.max_headers:
        msg = f"request headers are larger than {pipeline.max_headers} bytes"
        return await _deny(send, ctx, Deny(431, "headers_too_large", msg))
    if _bad_path(path):
        return await _deny(send, ctx, Deny(400, "invalid_request", "invalid request path"))

    deny = await run_stages(route.before_body, ctx, tracing, route.before_ahead)
    if deny is not None:
        return await _deny(send, ctx, deny)

    clen: int | None = None
    if clen_raw is not None:
        if not clen_raw.isdigit():
            return await _deny(send, ctx, Deny(400, "invalid_request", "bad Content-Length"))
        clen = int(clen_raw)
        if clen > pipeline.max_body:
            msg = f"request body is larger than {pipeline.max_body} bytes"
            return await _deny(send, ctx, Deny(413, "body_too_large", msg))

    body: bytes | _BodyStream | None = None
    has_body = chunked or (clen is not None and clen > 0)
    try:
        if route.needs_body:
            ctx.body = await _read_body(receive, pipeline.max_body) if has_body else b""
            deny = await run_stages(route.after_body, ctx, tracing, route.after_ahead)
            if deny is not None:
                return await _deny(send, ctx, deny)
            body = ctx.body or None  # after the stages: a guardrail may have rewritten it
        elif has_body:
            first = await receive()
            chunk = first.get("body", b"")
            if len(chunk) > pipeline.max_body:
                raise BodyTooLarge(f"request body is larger than {pipeline.max_body} bytes")
            more = first.get("more_body")
            if more and not chunked and clen is not None and clen <= SMALL_REQUEST_BODY:
                # A small declared body is read whole before the upstream is called: a client
                # sending it slowly (or never finishing) then holds no upstream connection.
                chunk += await _read_body(receive, pipeline.max_body - len(chunk))
                more = False
            body = _BodyStream(receive, chunk, pipeline.max_body) if more else chunk
    except BodyTooLarge as exc:
        return await _deny(send, ctx, exc.deny())
    except ClientGone:
        ctx.status = 499  # gone mid-body (or cut off by body_read_timeout): not a 413
        return None

    upstream_span = None
    if tracing is not None and ctx.span is not None and ctx.span.is_recording():
        upstream_span = tracing.start_child("upstream", ctx.span, SpanKind.CLIENT)
    if upstream_span is not None:
        tp: str | None = traceparent(upstream_span)
    elif ctx.span is not None:
        tp = traceparent(ctx.span)
    else:
        tp = ctx.traceparent
    headers = _upstream_headers(
        pipeline, ctx, raw_headers, host, xff, peer, scope["scheme"], tp, isinstance(body, bytes)
    )
    target = scope.get("raw_path") or path.encode()
    qs: bytes = scope["query_string"]
    target_s = target.decode("latin-1") + ("?" + qs.decode("latin-1") if qs else "")
    sent_at = time.perf_counter()
    try:
        try:
            resp = await pipeline.upstream.request(method, target_s, headers, body)
        except UpstreamError as exc:
            if isinstance(body, _BodyStream) and body.error is not None:
                if isinstance(body.error, BodyTooLarge):
                    return await _deny(send, ctx, body.error.deny())
                ctx.status = 499  # the client left mid-body: nobody to answer
                return None
            metrics.UPSTREAM_ERRORS.labels(exc.kind).inc()
            return await _deny(send, ctx, exc.deny())
        ctx.upstream_seconds = time.perf_counter() - sent_at
        try:
            spans = _response_spans(tracing, ctx)
            try:
                await _respond(ctx, resp, receive, send, body is None or isinstance(body, bytes))
            finally:
                for span in spans:
                    span.end()
        finally:
            if resp.finished_at:
                ctx.upstream_waited = resp.finished_at - sent_at
            resp.close(reusable=resp.error_kind is None and not resp.abandoned)
            if resp.error_kind is not None:
                metrics.UPSTREAM_ERRORS.labels(resp.error_kind).inc()
    finally:
        if upstream_span is not None:
            upstream_span.end()


def _response_spans(tracing: Tracing | None, ctx: RequestContext) -> list[LeanSpan]:
    # One span per response stage (output guard, usage), open until the answer has passed.
    if tracing is None or not tracing.stage_spans or not ctx.route.response:
        return []
    span = ctx.span
    if span is None or not span.is_recording():
        return []
    return [tracing.start_child(stage.name, span) for stage in ctx.route.response]


def _start_trace(tracing: Tracing, ctx: RequestContext, carrier: dict[str, str], peer: str) -> None:
    span = None
    if tracing.records(carrier.get("traceparent")):
        span = tracing.start_server_span(
            f"{ctx.method} {ctx.route.name}",
            carrier,
            {
                "http.request.method": ctx.method,
                "url.path": ctx.path,
                "client.address": ctx.client_ip,
                "network.peer.address": peer,
                "gateway.request_id": ctx.request_id,
            },
        )
    if span is None:
        # Nothing is recorded: ids are propagated without a span object.
        tid, sid, flags = light_context(carrier.get("traceparent"))
        ctx.trace_id, ctx.span_id = tid, sid
        ctx.traceparent = f"00-{tid}-{sid}-{flags}"
        ctx.response_headers.append((b"traceparent", ctx.traceparent.encode()))
        return
    ctx.span = span
    ctx.trace_id = f"{span.trace_id:032x}"
    ctx.span_id = f"{span.span_id:016x}"
    ctx.response_headers.append((b"traceparent", span.traceparent().encode()))


async def _read_body(receive: Receive, limit: int) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone("client disconnected")  # nobody is left to read the answer
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise BodyTooLarge(f"request body is larger than {limit} bytes")
        parts.append(chunk)
        if not message.get("more_body"):
            return b"".join(parts)


class ClientGone(GatewayError):
    """The client disconnected while its body was being read."""


class _BodyStream:
    """The client's body streamed upstream, counted; remembers why it stopped, since the
    upstream client wraps whatever the iterator raises in its own error."""

    __slots__ = ("error", "first", "limit", "receive")

    def __init__(self, receive: Receive, first: bytes, limit: int) -> None:
        self.receive = receive
        self.first = first
        self.limit = limit
        self.error: GatewayError | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        total = len(self.first)
        if self.first:
            yield self.first
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.error = GatewayError("client disconnected")
                raise self.error
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.limit:
                self.error = BodyTooLarge(f"request body is larger than {self.limit} bytes")
                raise self.error
            if chunk:
                yield chunk
            if not message.get("more_body"):
                return


def _upstream_headers(
    pipeline: Pipeline,
    ctx: RequestContext,
    raw: Headers,
    host: bytes | None,
    xff: list[bytes],
    peer: str,
    scheme: str,
    tp: str | None,
    drop_length: bool,
) -> Headers:
    # ``drop_length``: the body goes as bytes (maybe rewritten), the client sets its length.
    strip = pipeline.strip_headers
    named = connection_tokens(raw) if has_header(raw, b"connection") else frozenset()
    own = {k for k, _ in ctx.upstream_headers} if ctx.upstream_headers else None
    out: Headers = []
    for k, v in raw:
        if is_hop_by_hop(k, named) or k in GATEWAY_SET or k in strip:
            continue
        if k == b"host" and not pipeline.upstream.cfg.preserve_host:
            continue
        if (k == b"content-length" and drop_length) or (k == b"traceparent" and tp is not None):
            continue
        if own is not None and k in own:
            continue
        out.append((k, v))
    if xff and pipeline.client_ip.enabled and pipeline.client_ip.is_trusted(peer):
        out.append((b"x-forwarded-for", b", ".join(xff) + b", " + peer.encode()))
    else:
        out.append((b"x-forwarded-for", peer.encode()))
    out.append((b"x-forwarded-proto", scheme.encode()))
    if host is not None:
        out.append((b"x-forwarded-host", host))
    out.append((b"x-request-id", ctx.request_id.encode()))
    if tp is not None:
        out.append((b"traceparent", tp.encode()))
    out.extend(ctx.upstream_headers)
    return out


async def _respond(
    ctx: RequestContext, resp: UpstreamResponse, receive: Receive, send: Send, body_done: bool
) -> None:
    head = ResponseHead(resp.status, clean_response_headers(resp.headers))
    head.headers.append((b"x-request-id", ctx.request_id.encode()))
    head.headers.extend(ctx.response_headers)
    filters = [f for s in ctx.route.response if (f := s.on_response(ctx, head)) is not None]
    ctx.status = head.status
    clen = resp.content_length
    for f in filters:
        if f.buffer:
            return await _respond_buffered(resp, head, filters, send)
    if not filters and clen is not None and clen <= SMALL_BODY:
        try:
            payload = await resp.read() if clen else b""
        except UpstreamError as exc:
            resp.error_kind = exc.kind  # nothing sent yet: the client gets a clean 502
            return await _deny(send, ctx, exc.deny())
        return await send_simple(send, head.status, head.headers, payload)
    await send({"type": "http.response.start", "status": head.status, "headers": head.headers})
    watch = body_done and _is_event_stream(head.headers)
    if watch:
        pump = asyncio.ensure_future(_pump(resp, filters, send))
        gone = asyncio.ensure_future(_disconnected(receive))
        await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not pump.done():
            pump.cancel()  # the client left: stop reading the upstream's stream
            resp.error_kind = resp.error_kind or "client_gone"
            return
        gone.cancel()
        complete = pump.result()
    else:
        complete = await _pump(resp, filters, send)
    if complete:
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _pump(resp: UpstreamResponse, filters: list[BodyFilter], send: Send) -> bool:
    """Stream the body through the filters; False when a declared length cannot be met."""
    async for chunk in resp.chunks():
        for f in filters:
            chunk = await f.on_chunk(chunk)
        if chunk:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if filters and any(getattr(f, "finished", False) for f in filters):
            resp.abandoned = True  # a filter ended the answer (e.g. a guardrail stopped it)
            break
    tail = b""
    for f in filters:
        tail = await f.on_chunk(tail) if tail else tail
        tail += await f.on_end()
    if tail:
        await send({"type": "http.response.body", "body": tail, "more_body": True})
    # A broken fixed-length body cannot be ended cleanly: returning without completing makes
    # the server close the connection, which tells the client it was cut short.
    return resp.error_kind is None or resp.content_length is None


async def _respond_buffered(
    resp: UpstreamResponse, head: ResponseHead, filters: list[BodyFilter], send: Send
) -> None:
    if resp.complete and resp.content_length is not None and resp.content_length <= SMALL_BODY:
        # all of it is in already (a small answer, read with its head): taken as it is
        body = await resp.read()
    else:
        parts: list[bytes] = []
        total = 0
        async for chunk in resp.chunks():
            total += len(chunk)
            if total > MAX_BUFFERED_RESPONSE:
                resp.error_kind = "too_large"
                break
            parts.append(chunk)
        body = b"".join(parts)
    for f in filters:
        body = await f.on_chunk(body) + await f.on_end()
    headers = [(k, v) for k, v in head.headers if k != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await send_simple(send, head.status, headers, body)


async def _disconnected(receive: Receive) -> None:
    # An unread (empty) request body may still be queued before the disconnect event.
    while (await receive())["type"] != "http.disconnect":
        pass


def _is_event_stream(headers: Headers) -> bool:
    for k, v in headers:
        if k == b"content-type":
            return v.startswith(b"text/event-stream")
    return False
