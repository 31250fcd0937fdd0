"""Asking for stream usage on the client's behalf, and hiding the answer's usage event."""

from __future__ import annotations

import asyncio
import copy
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.context import RequestContext
from gateway.llm.include_usage import UNREAD, UsageEventStripper, wants_injection
from gateway.stages.usage import IncludeUsageStage

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


def reference(path: str, body: bytes) -> bytes | None:
    """``wants_injection`` as it was before it could take the decoded document."""
    if not path.endswith(("/chat/completions", "/completions")) or b'"stream"' not in body:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("stream") is not True:
        return None
    options = doc.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return None
    doc["stream_options"] = {**options, "include_usage": True}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 2), st.text(max_size=3), st.just([]), st.just({})
)
OPTIONS = st.one_of(
    VALUES, st.dictionaries(st.sampled_from(["include_usage", "x"]), VALUES, max_size=2)
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    doc: dict[str, object] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    streams = st.one_of(st.just(True), VALUES)  # mostly streamed, where the work is
    for key, values in (("stream", streams), ("stream_options", OPTIONS), ("n", VALUES)):
        if draw(st.booleans()):
            doc[key] = draw(values)
    keys = draw(st.permutations(list(doc)))
    text = json.dumps(
        {k: doc[k] for k in keys}, separators=draw(st.sampled_from([None, (",", ":")]))
    )
    if draw(st.integers(0, 3)) == 0:  # a key only a JSON decoder sees as "stream"
        text = text.replace('"stream"', '"\\u0073tream"')
    return text.encode()


@settings(max_examples=400, deadline=None)
@given(bodies(), st.sampled_from([CHAT, "/v1/completions", "/v1/messages"]))
def test_a_decoded_document_gives_the_same_answer_and_stays_unchanged(
    body: bytes, path: str
) -> None:
    doc = json.loads(body)
    before = copy.deepcopy(doc)
    expected = reference(path, body)
    assert wants_injection(path, body) == expected
    assert wants_injection(path, body, doc) == expected
    assert doc == before and list(doc) == list(before)


def test_a_document_that_is_not_an_object_or_not_json() -> None:
    assert wants_injection(CHAT, b'["stream"]', ["stream"]) is None
    assert wants_injection(CHAT, b'{"stream": true', UNREAD) is None


def test_the_stage_reuses_a_body_another_stage_decoded() -> None:
    stage = IncludeUsageStage()
    route = type("R", (), {"name": "chat", "layer": None})()
    body = b'{"model":"m","stream":true,"messages":[]}'
    ctx = RequestContext({"type": "http"}, "r", route, "POST", "/v1/chat/completions", "ip", [])
    ctx.body = body
    assert ctx.decoded_body(UNREAD) is UNREAD  # nobody decoded it yet
    doc = ctx.json_body()
    assert ctx.decoded_body(UNREAD) is doc
    asyncio.run(stage.on_request(ctx))
    assert json.loads(ctx.body)["stream_options"] == {"include_usage": True}
    assert "stream_options" not in doc  # the shared document is left as it was
    assert ctx.decoded_body(UNREAD) is UNREAD  # a new body: the old document is not its own
