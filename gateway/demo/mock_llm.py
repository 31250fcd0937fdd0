"""Bundled mock OpenAI-compatible LLM service (pure ASGI, served by uvicorn).

Used by the demo, the tests and the load tests as a deterministic upstream.

Endpoints:
    ``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON or SSE with
    ``"stream": true``), ``GET /v1/models``, ``GET /health``, ``ANY /echo/...``
    (request echo for proxy tests). Anything else is a 404.

Replies are ``"Echo: " + <last user message | prompt>`` (truncated to ``max_tokens``
words, ``finish_reason: "length"``). Header ``X-Mock-Unsafe: 1`` or the marker
``[[unsafe]]`` in the last user message/prompt yields an HTML/script laden reply.
Header ``X-Mock-Latency: <seconds>`` overrides ``token_latency`` (clamped to 0..30).
Tokens are whitespace-separated words (see :mod:`gateway.demo.mock_llm_text`).

Run: ``python -m gateway.demo.mock_llm --port 8081 [--token-latency 0.02]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import uvicorn

from gateway.demo.mock_llm_text import Reply, RequestError, parse_chat, parse_completion

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_JSON_BODY = 8 * 1024 * 1024
MAX_LATENCY = 30.0


@dataclass(frozen=True, slots=True)
class MockLLMConfig:
    """Mock behaviour: per-token delay in seconds and the default model name."""

    token_latency: float = 0.0
    model: str = "mock-gpt"


class _Disconnected(Exception):
    """The client went away while the request body was being read."""


def _headers(scope: Scope) -> dict[str, str]:
    """Decode request headers to ``{lower-name: value}`` (duplicates joined by ", ")."""
    out: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", []):
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


async def _read_body(receive: Receive, limit: int | None) -> tuple[bytes, int, str]:
    """Read the whole body; return (body or b"" if unbuffered, length, sha256 hex)."""
    digest, parts, size = hashlib.sha256(), [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        digest.update(chunk)
        if limit is not None:
            if size > limit:
                raise RequestError(f"request body larger than {limit} bytes")
            parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts), size, digest.hexdigest()


async def _send_json(send: Send, status: int, payload: Any) -> None:
    """Send a complete JSON response."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _error(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _latency(headers: dict[str, str], default: float) -> float:
    """Per-request token latency: ``X-Mock-Latency`` (clamped 0..30) or the default."""
    try:
        value = float(headers.get("x-mock-latency", default))
    except ValueError:
        value = default
    return default if math.isnan(value) else min(max(value, 0.0), MAX_LATENCY)


async def _client_gone(gone: asyncio.Event, delay: float) -> bool:
    """Sleep ``delay`` seconds unless the client disconnects; return True if it has."""
    if delay > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gone.wait(), delay)
    return gone.is_set()


def _new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def _envelope(reply: Reply, chat: bool, rid: str, created: int) -> dict[str, Any]:
    """Common fields of a (chunk) response object."""
    kind = "chat.completion" if chat else "text_completion"
    obj = kind + (".chunk" if chat and reply.stream else "")
    return {"id": rid, "object": obj, "created": created, "model": reply.model}


def _json_reply(reply: Reply, chat: bool, rid: str, created: int) -> dict[str, Any]:
    """The non-streaming OpenAI response object."""
    choice: dict[str, Any] = {"index": 0}
    if chat:
        choice["message"] = {"role": "assistant", "content": reply.text}
    else:
        choice.update(text=reply.text, logprobs=None)
    choice["finish_reason"] = reply.finish_reason
    return {**_envelope(reply, chat, rid, created), "choices": [choice], "usage": reply.usage()}


async def _stream(
    send: Send, reply: Reply, chat: bool, latency: float, gone: asyncio.Event
) -> None:
    """Stream ``reply`` as SSE, one ASGI body message per chunk."""
    rid, created = _new_id(chat), int(time.time())
    headers = [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-cache"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})

    def chunk(text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if chat:
            delta = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice.update(delta=delta, logprobs=None, finish_reason=finish)
        else:
            choice.update(text=text or "", logprobs=None, finish_reason=finish)
        out = {**_envelope(reply, chat, rid, created), "choices": [choice]}
        if reply.include_usage:
            out["usage"] = None  # as OpenAI does: usage only on the final extra chunk
        return out

    async def emit(obj: Any) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
        await send(
            {"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True}
        )

    if chat:
        await emit(chunk("", None, role=True))
    for piece in reply.chunks:
        if await _client_gone(gone, latency):
            return
        await emit(chunk(piece, None))
    await emit(chunk(None, reply.finish_reason))
    if reply.include_usage:
        await emit({**_envelope(reply, chat, rid, created), "choices": [], "usage": reply.usage()})
    await emit("[DONE]")
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _completion(
    scope: Scope, receive: Receive, send: Send, cfg: MockLLMConfig, chat: bool
) -> None:
    """Handle ``/v1/chat/completions`` (``chat``) and ``/v1/completions``."""
    headers = _headers(scope)
    try:
        raw, _, _ = await _read_body(receive, MAX_JSON_BODY)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise RequestError(f"malformed JSON body: {exc}") from None
        unsafe = headers.get("x-mock-unsafe", "").strip().lower() in {"1", "true", "yes"}
        reply = (parse_chat if chat else parse_completion)(body, cfg.model, unsafe)
    except RequestError as exc:
        await _send_json(send, 400, _error(str(exc)))
        return
    latency, gone = _latency(headers, cfg.token_latency), asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.create_task(watch())
    try:
        if reply.stream:
            await _stream(send, reply, chat, latency, gone)
        elif not await _client_gone(gone, latency * reply.completion_tokens):
            await _send_json(send, 200, _json_reply(reply, chat, _new_id(chat), int(time.time())))
    finally:
        watcher.cancel()


async def _echo(scope: Scope, receive: Receive, send: Send) -> None:
    """Echo method, path, query string, headers and a body digest as JSON."""
    _, size, digest = await _read_body(receive, None)
    await _send_json(
        send,
        200,
        {
            "method": scope["method"],
            "path": scope["path"],
            "query_string": scope.get("query_string", b"").decode("latin-1"),
            "headers": _headers(scope),
            "body_len": size,
            "body_sha256": digest,
        },
    )


def create_app(config: MockLLMConfig | None = None) -> ASGIApp:
    """Build the mock LLM ASGI application."""
    cfg = config or MockLLMConfig()
    models = {
        "object": "list",
        "data": [{"id": cfg.model, "object": "model", "created": 0, "owned_by": "gateway-demo"}],
    }

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # no lifespan needs; refuse websockets
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1000})
            return
        method, path = scope["method"], scope["path"]
        try:
            if path == "/echo" or path.startswith("/echo/"):
                await _echo(scope, receive, send)
            elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
                await _completion(scope, receive, send, cfg, path == "/v1/chat/completions")
            elif method == "GET" and path == "/v1/models":
                await _send_json(send, 200, models)
            elif method == "GET" and path == "/health":
                await _send_json(send, 200, {"status": "ok"})
            else:
                await _send_json(send, 404, _error(f"no route for {method} {path}", "not_found"))
        except _Disconnected:
            return

    return app


async def serve(host: str, port: int, config: MockLLMConfig | None = None) -> None:
    """Serve the mock LLM with uvicorn until SIGINT/SIGTERM or until cancelled."""
    uv_config = uvicorn.Config(
        create_app(config),
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        proxy_headers=False,
        lifespan="off",
    )
    server = uvicorn.Server(uv_config)
    try:
        await server.serve()
    finally:  # also on cancellation: stop listening and close open connections
        for listener in getattr(server, "servers", []):
            listener.close()
        for connection in list(server.server_state.connections):
            connection.shutdown()


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: ``python -m gateway.demo.mock_llm``."""
    parser = argparse.ArgumentParser(description="Mock OpenAI-compatible LLM service")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--token-latency", type=float, default=0.0)
    parser.add_argument("--model", default="mock-gpt")
    args = parser.parse_args(argv)
    cfg = MockLLMConfig(token_latency=args.token_latency, model=args.model)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(args.host, args.port, cfg))


if __name__ == "__main__":
    main()
