"""Usage estimates, usage in JSON answers and event streams, prices."""

from __future__ import annotations

import json

import pytest

from gateway.llm.usage import (
    MAX_JSON_ANSWER,
    JsonUsage,
    Prices,
    SseUsage,
    Tokens,
    estimate_request,
    usage_from_json,
)
from gateway.policy.sections import CostConfig


@pytest.mark.parametrize(
    ("doc", "ceiling"),
    [
        ({"model": "m", "max_tokens": 50}, 50),
        ({"model": "m", "max_completion_tokens": 70, "max_tokens": 50}, 70),
        ({"model": "m", "max_output_tokens": 40}, 40),
        ({"model": "m", "max_tokens": 50, "n": 3}, 150),
        ({"model": "m"}, 1024),
        ({"model": "m", "max_tokens": True}, 1024),
        ({"model": 5, "max_tokens": -1}, 1024),
    ],
)
def test_estimate(doc: dict[str, object], ceiling: int) -> None:
    body = json.dumps(doc).encode()
    est = estimate_request(body, 1024)
    assert est is not None
    assert est.max_tokens == ceiling
    assert est.prompt_tokens == -(-len(body) // 3)
    assert est.model == ("m" if doc["model"] == "m" else None)
    assert est.tokens == est.prompt_tokens + ceiling


@pytest.mark.parametrize("body", [b"", b"hello", b"[1]", b"{bad", b'"x"'])
def test_no_estimate_without_a_json_object(body: bytes) -> None:
    assert estimate_request(body, 100) is None


OPENAI = {"model": "gpt", "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
RESPONSES = {"model": "gpt", "usage": {"input_tokens": 5, "output_tokens": 6}}
ANTHROPIC_START = {"type": "message_start", "message": {"model": "claude", "usage": {
    "input_tokens": 9, "output_tokens": 1}}}  # fmt: skip
ANTHROPIC_DELTA = {"type": "message_delta", "usage": {"output_tokens": 12}}


def test_usage_from_json_formats() -> None:
    assert usage_from_json(OPENAI) == Tokens(3, 4, "gpt")
    assert usage_from_json(RESPONSES) == Tokens(5, 6, "gpt")
    assert usage_from_json(ANTHROPIC_START) == Tokens(9, 1, "claude")
    assert usage_from_json(ANTHROPIC_DELTA) == Tokens(0, 12, None)
    for nothing in ({"usage": None}, {"usage": {}}, [], {"usage": {"prompt_tokens": "3"}}):
        assert usage_from_json(nothing) is None


def test_json_answer_in_pieces_and_too_large() -> None:
    raw = json.dumps({"choices": [{"text": "hi"}], **OPENAI}).encode()
    for cut in range(len(raw)):
        j = JsonUsage()
        j.feed(raw[:cut])
        j.feed(raw[cut:])
        assert j.result() == Tokens(3, 4, "gpt")
    big = JsonUsage()
    big.feed(b" " * MAX_JSON_ANSWER)
    big.feed(raw)
    assert big.result() is None
    broken = JsonUsage()
    broken.feed(raw[:-1])
    assert broken.result() is None


def _sse(*events: object) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


def test_sse_usage_split_anywhere() -> None:
    stream = (
        _sse({"choices": [{"delta": {"content": "a"}}], "usage": None}, {**OPENAI, "choices": []})
        + b"data: [DONE]\n\n"
    )
    for cut in range(len(stream)):
        s = SseUsage()
        s.feed(stream[:cut])
        s.feed(stream[cut:])
        assert s.result() == Tokens(3, 4, "gpt"), cut


def test_sse_anthropic_events_merge_and_last_line_without_newline() -> None:
    s = SseUsage()
    s.feed(b"event: message_start\r\n" + _sse(ANTHROPIC_START).replace(b"\n", b"\r\n"))
    s.feed(b"event: message_delta\n" + _sse(ANTHROPIC_DELTA)[:-2])  # no final newline
    assert s.result() == Tokens(9, 12, "claude")
    none = SseUsage()
    none.feed(b"data: " + b"x" * (2 * 1024 * 1024))  # an endless line is dropped, not kept
    none.feed(b"\n" + _sse({"choices": []}))
    assert none.result() is None


def test_prices() -> None:
    cfg = CostConfig.model_validate(
        {"models": {"a": {"input_per_1k": 1, "output_per_1k": 2}},
         "default": {"input_per_1k": 0.5, "output_per_1k": 0.5}}
    )  # fmt: skip
    prices = Prices(cfg)
    assert prices.cost("a", 1000, 500) == 2.0
    assert prices.cost("other", 1000, 1000) == 1.0
    assert prices.cost(None, 2000, 0) == 1.0
    assert Prices(None).cost("a", 1000, 1000) == 0.0
