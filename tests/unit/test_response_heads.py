"""Which answers the response stages read, from their heads, and ``X-Guardrail-Action``."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.context import RequestContext
from gateway.errors import UpstreamError
from gateway.guard import outcome
from gateway.guard.sse import SseGuard
from gateway.http1 import request_head
from gateway.llm.usage import JsonUsage, SseUsage
from gateway.pipeline import Pipeline, ResponseHead
from gateway.policy import load_policy_text
from gateway.stages.guard_output import (
    OutputGuardStage,
    _JsonGuard,
    build_output_guard_stages,
)
from gateway.stages.usage import UsageFilter, UsageStage, build_usage_stages

POLICY = """version: 1
upstream: {url: 'http://127.0.0.1:9'}
guardrails: {output: {rules: [unsafe-markup], action: block}}
cost: {default: {input_per_1k: 0.01, output_per_1k: 0.02}}
"""


def _stages() -> tuple[RequestContext, OutputGuardStage, UsageStage]:
    p = Pipeline(load_policy_text(POLICY), (build_output_guard_stages, build_usage_stages))
    route = p.router.match("GET", "/x")
    guard, usage = route.response
    assert isinstance(guard, OutputGuardStage) and isinstance(usage, UsageStage)
    return RequestContext({}, "rid", route, "GET", "/x", "192.0.2.1", []), guard, usage


@pytest.mark.parametrize(
    ("status", "headers", "kind"),
    [
        (200, [(b"content-type", b"application/json")], "json"),
        (201, [(b"content-type", b"Application/JSON; charset=utf-8")], "json"),
        (200, [(b"content-type", b"application/problem+json")], "json"),
        (200, [(b"content-type", b"text/event-stream")], "sse"),
        (200, [(b"content-type", b"text/plain")], None),
        (200, [], None),
        (404, [(b"content-type", b"application/json")], None),
        (200, [(b"content-type", b"text/plain"), (b"content-type", b"application/json")], None),
        (200, [(b"content-type", b""), (b"content-type", b"application/json")], None),
        (200, [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")], "gzip"),
        (200, [(b"content-encoding", b"GZIP"), (b"content-type", b"text/event-stream")], "gzip"),
        (200, [(b"content-type", b"application/json"), (b"content-encoding", b"Identity")], "json"),
        (200, [(b"content-type", b"application/json"), (b"content-encoding", b"")], "json"),
        (
            200,
            [
                (b"content-type", b"application/json"),
                (b"content-encoding", b"identity"),
                (b"content-encoding", b"gzip"),
            ],
            "json",
        ),
    ],
)
def test_the_output_guard_reads_json_and_streams_it_can_decode(
    status: int, headers: list[tuple[bytes, bytes]], kind: str | None
) -> None:
    ctx, guard, _ = _stages()
    f = guard.on_response(ctx, ResponseHead(status, headers))
    if kind is None:
        assert f is None
    elif kind == "sse":
        assert isinstance(f, SseGuard)
    else:
        assert isinstance(f, _JsonGuard) and f.unreadable is (kind == "gzip")


@pytest.mark.parametrize(
    ("headers", "scanner"),
    [
        ([(b"content-type", b"application/json")], JsonUsage),
        ([(b"content-type", b"application/x-ndjson")], JsonUsage),
        ([(b"content-type", b"text/event-stream; charset=utf-8")], SseUsage),
        ([(b"content-type", b"text/html"), (b"content-type", b"application/json")], None),
        ([(b"x-other", b"json")], None),
        ([], None),
    ],
)
def test_the_usage_stage_reads_json_and_streams(
    headers: list[tuple[bytes, bytes]], scanner: type | None
) -> None:
    ctx, _, usage = _stages()
    f = usage.on_response(ctx, ResponseHead(200, headers))
    if scanner is None:
        assert f is None
    else:
        assert isinstance(f, UsageFilter) and type(f.scanner) is scanner


def test_guardrail_header_replaces_the_input_guardrails_value() -> None:
    ctx, guard, _ = _stages()
    head = ResponseHead(
        200,
        [
            (b"content-type", b"application/json"),
            (outcome.HEADER, b"pass"),  # as the input guardrail left it
            (b"x-request-id", b"rid"),
        ],
    )
    f = guard.on_response(ctx, head)
    assert f is not None
    answer = {"choices": [{"message": {"content": "<script>alert(1)</script>"}}]}
    body = asyncio.run(f.on_chunk(json.dumps(answer).encode()))
    assert json.loads(body)["error"]["type"] == "unsafe_response"
    assert head.headers == [
        (b"x-request-id", b"rid"),
        (b"content-type", b"application/json"),
        (outcome.HEADER, b"block"),
    ]


def test_guardrail_header_of_every_action() -> None:
    ctx, _, _ = _stages()
    for action in outcome.SEVERITY:
        ctx.notes[outcome.NOTE] = action
        headers = [(b"a", b"1")]
        outcome.set_header(headers, ctx)
        assert headers == [(b"a", b"1"), (outcome.HEADER, action.encode())]
    del ctx.notes[outcome.NOTE]
    headers = []
    outcome.set_header(headers, ctx)
    assert headers == [(outcome.HEADER, b"pass")]


@pytest.mark.parametrize(
    "headers",
    [
        [(b"x-a", b"ok\r\nx-injected: 1")],
        [(b"x-a", b"ok\nx-injected: 1")],
        [(b"x-a", b"ok\r")],
        [(b"x-a:b", b"ok")],
        [(b"x-a\r\nx-b", b"ok")],
    ],
)
def test_upstream_request_head_refuses_a_header_that_would_split(
    headers: list[tuple[bytes, bytes]],
) -> None:
    with pytest.raises(UpstreamError):
        request_head("POST", "/v1/chat", [(b"accept", b"*/*"), *headers], b"up")


def test_upstream_request_head_lines() -> None:
    head = request_head("GET", "/a?b=c:d", [(b"x-url", b"http://h:1/p")], b"up:8080")
    assert head == b"GET /a?b=c:d HTTP/1.1\r\nx-url: http://h:1/p\r\nhost: up:8080\r\n\r\n"
    with pytest.raises(UpstreamError):
        request_head("GET", "/a\r\nx: y", [], b"up")
