"""The output guardrail decodes a JSON answer once and the usage stage reads that document."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

import gateway.llm.usage as llm_usage
from gateway.context import Identity, RequestContext
from gateway.llm.usage import ANSWER_DOC, JsonUsage, Tokens
from gateway.pipeline import Pipeline, ResponseHead
from gateway.policy import load_policy_text
from gateway.stages.guard_output import build_output_guard_stages
from gateway.stages.ratelimit import RESERVATION, build_ratelimit_stages
from gateway.stages.usage import build_usage_stages

ANSWER = {
    "id": "c1",
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Fine."}}],
    "usage": {"prompt_tokens": 20, "completion_tokens": 30},
}
UNSAFE = {**ANSWER, "choices": [{"index": 0, "message": {"content": "<script>x</script>"}}]}


def test_json_usage_reads_the_document_offered_for_its_bytes() -> None:
    raw = json.dumps(ANSWER).encode()
    other = {"model": "x", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}
    same = JsonUsage()
    same.feed(raw)
    assert same.result((raw, other)) == Tokens(1, 2, "x")  # the very bytes: not decoded
    copy = JsonUsage()
    copy.feed(raw[:7])
    copy.feed(raw[7:])
    assert copy.result((raw, other)) == Tokens(1, 2, "x")  # equal bytes
    changed = JsonUsage()
    changed.feed(raw.replace(b"20", b"21"))
    assert changed.result((raw, other)) == Tokens(21, 30, "m")  # other bytes: decoded
    without = JsonUsage()
    without.feed(json.dumps({"model": "m"}).encode())
    assert without.result((raw, other)) is None  # no "usage" in the answer: not even looked up


POLICY = """version: 1
upstream: {url: 'http://127.0.0.1:9'}
state: {key_prefix: KEY}
rate_limits: {tokens_per_tier: {free: 100000/minute}}
guardrails:
  output: {rules: [unsafe-markup], action: ACTION, fallback: "Sorry."}
cost: {default: {input_per_1k: 0.01, output_per_1k: 0.02}}
"""


def _pipeline(action: str = "replace") -> Pipeline:
    text = POLICY.replace("KEY", f"doc{time.time_ns()}").replace("ACTION", action)
    stages = (build_ratelimit_stages, build_output_guard_stages, build_usage_stages)
    return Pipeline(load_policy_text(text), stages)


class _Decodes:
    """Counts the decodes the usage stage does itself."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = llm_usage.decode_json

        def counting(body: bytes) -> Any:
            self.count += 1
            return real(body)

        monkeypatch.setattr(llm_usage, "decode_json", counting)


async def _answer(
    p: Pipeline, answer: bytes, app_order: bool = True
) -> tuple[RequestContext, bytes]:
    """One request with a reservation, then ``answer`` through the response stages the way
    the gateway runs them (every ``on_response`` first), or one stage after the other."""
    ctx = RequestContext({}, "rid", p.router.match("POST", "/x"), "POST", "/x", "192.0.2.1", [])
    ctx.identity = Identity("alice", "free", {})
    ctx.body = json.dumps({"model": "m", "max_tokens": 100, "messages": []}).encode()
    for stage in [*ctx.route.before_body, *ctx.route.after_body]:
        assert await stage.on_request(ctx) is None
    assert RESERVATION in ctx.notes
    head = ResponseHead(200, [(b"content-type", b"application/json")])
    body = answer
    if app_order:
        filters = [f for s in ctx.route.response if (f := s.on_response(ctx, head)) is not None]
        for f in filters:
            body = await f.on_chunk(body) + await f.on_end()
    else:
        for s in ctx.route.response:
            f = s.on_response(ctx, head)
            assert f is not None
            body = await f.on_chunk(body) + await f.on_end()
    for s in ctx.route.finishers:
        s.on_finish(ctx)
    return ctx, body


@pytest.mark.parametrize("app_order", [True, False])
def test_usage_reads_the_guard_document(monkeypatch: pytest.MonkeyPatch, app_order: bool) -> None:
    decodes = _Decodes(monkeypatch)
    raw = json.dumps(ANSWER).encode()
    ctx, body = asyncio.run(_answer(_pipeline(), raw, app_order))
    assert body == raw
    assert (ctx.usage.input_tokens, ctx.usage.output_tokens, ctx.usage.estimated) == (20, 30, False)
    assert decodes.count == 0
    assert ANSWER_DOC not in ctx.notes  # notes go to the access log


def test_a_replaced_answer_is_read_from_the_rewritten_document(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decodes = _Decodes(monkeypatch)
    ctx, body = asyncio.run(_answer(_pipeline(), json.dumps(UNSAFE).encode()))
    doc = json.loads(body)
    assert doc["choices"][0]["message"]["content"] == "Sorry."
    assert doc["choices"][0]["finish_reason"] == "content_filter"
    assert (ctx.usage.input_tokens, ctx.usage.output_tokens, ctx.usage.estimated) == (20, 30, False)
    assert decodes.count == 0 and ANSWER_DOC not in ctx.notes


def test_a_blocked_answer_leaves_no_document(monkeypatch: pytest.MonkeyPatch) -> None:
    decodes = _Decodes(monkeypatch)
    ctx, body = asyncio.run(_answer(_pipeline("block"), json.dumps(UNSAFE).encode()))
    assert json.loads(body)["error"]["type"] == "unsafe_response"
    assert ctx.usage.estimated  # the error body carries no usage: the estimate is charged
    assert decodes.count == 0  # no "usage" in the error body: not even decoded
    assert ANSWER_DOC not in ctx.notes


def test_bytes_changed_after_the_guard_are_decoded_again(monkeypatch: pytest.MonkeyPatch) -> None:
    decodes = _Decodes(monkeypatch)
    p = _pipeline()

    async def go() -> RequestContext:
        ctx, _ = await _answer(p, b"{}")  # a first request, to get a context and reservation
        ctx.notes.clear()
        ctx.body = json.dumps({"model": "m", "max_tokens": 100}).encode()
        for stage in ctx.route.after_body:
            assert await stage.on_request(ctx) is None
        head = ResponseHead(200, [(b"content-type", b"application/json")])
        guard, usage = (s.on_response(ctx, head) for s in ctx.route.response)
        assert guard is not None and usage is not None
        raw = json.dumps(ANSWER).encode()
        assert await guard.on_chunk(raw) is raw
        assert ctx.notes[ANSWER_DOC][0] is raw
        changed = raw.replace(b"30", b"31")  # as if a filter in between rewrote the body
        await usage.on_chunk(changed)
        await usage.on_end()
        for stage in ctx.route.finishers:  # as the gateway does, once the answer has left
            stage.on_finish(ctx)
        return ctx

    ctx = asyncio.run(go())
    assert (ctx.usage.input_tokens, ctx.usage.output_tokens) == (20, 31)
    assert decodes.count == 1 and ANSWER_DOC not in ctx.notes


def test_without_a_usage_stage_the_document_does_not_reach_the_log() -> None:
    text = POLICY.replace("KEY", "solo").replace("ACTION", "replace")
    text = text.replace("rate_limits: {tokens_per_tier: {free: 100000/minute}}\n", "")
    text = text.replace("cost: {default: {input_per_1k: 0.01, output_per_1k: 0.02}}\n", "")
    p = Pipeline(load_policy_text(text), (build_output_guard_stages, build_usage_stages))

    async def go() -> RequestContext:
        ctx = RequestContext({}, "rid", p.router.match("GET", "/x"), "GET", "/x", "192.0.2.1", [])
        assert [s.name for s in ctx.route.response] == ["guard_output"]
        head = ResponseHead(200, [(b"content-type", b"application/json")])
        (f,) = (s.on_response(ctx, head) for s in ctx.route.response)
        assert f is not None
        await f.on_chunk(json.dumps(ANSWER).encode())
        await f.on_end()
        assert ANSWER_DOC in ctx.notes
        for s in ctx.route.finishers:
            s.on_finish(ctx)
        return ctx

    assert ANSWER_DOC not in asyncio.run(go()).notes
