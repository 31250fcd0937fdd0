"""Asking for stream usage on the client's behalf, and hiding the answer's usage event."""

from __future__ import annotations

import json

from gateway.llm.include_usage import UsageEventStripper, wants_injection

CHAT = "/v1/chat/completions"


def test_injects_only_for_streamed_openai_requests_without_it() -> None:
    body = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
    new = wants_injection(CHAT, body)
    assert new is not None
    assert json.loads(new)["stream_options"] == {"include_usage": True}
    keep = {"model": "m", "stream": True, "stream_options": {"x": 1}, "messages": []}
    out = wants_injection("/v1/completions", json.dumps(keep).encode())
    assert out is not None and json.loads(out)["stream_options"] == {"x": 1, "include_usage": True}
    asked = {"stream": True, "stream_options": {"include_usage": True}}
    assert wants_injection(CHAT, json.dumps(asked).encode()) is None
    assert wants_injection(CHAT, b'{"stream": false}') is None
    assert wants_injection(CHAT, b"not json") is None
    assert wants_injection("/v1/messages", body) is None  # Anthropic would refuse the field


def event(doc: object) -> bytes:
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def test_stripper_drops_only_the_usage_event_even_when_split() -> None:
    first = event({"choices": [{"delta": {"content": "hi"}}], "usage": None})
    usage = event({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}})
    done = b"data: [DONE]\n\n"
    stream = first + usage + done
    for cut in range(1, len(stream)):
        s = UsageEventStripper()
        out = s.feed(stream[:cut]) + s.feed(stream[cut:]) + s.end()
        assert out == first + done, cut


def test_stripper_passes_other_streams_through() -> None:
    s = UsageEventStripper()
    data = b"event: ping\ndata: {}\n\n"
    assert s.feed(data) == data
    assert s.feed(b"partial") == b"" and s.end() == b"partial"
