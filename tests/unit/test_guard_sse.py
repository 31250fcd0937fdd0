"""The streaming filter: hold-back, split patterns, the final fallback events."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.guard.engine import Verdict
from gateway.guard.output import AnswerChecker
from gateway.guard.sse import SseGuard, _first_trigger
from gateway.policy.sections import OutputGuardConfig

HEAD = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def _chunk(text: str | None, finish: str | None = None) -> bytes:
    delta = {"content": text} if text is not None else {}
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return f"data: {json.dumps({**HEAD, 'choices': [choice]})}\n\n".encode()


def _guard(**cfg: Any) -> tuple[SseGuard, list[Verdict]]:
    seen: list[Verdict] = []
    checker = AnswerChecker(OutputGuardConfig.model_validate({"rules": ["unsafe-markup"], **cfg}))
    return SseGuard(checker, seen.append), seen


def _events(data: bytes) -> list[Any]:
    out = []
    for block in data.decode().split("\n\n"):
        if block.startswith("data: "):
            body = block[6:]
            out.append(body if body == "[DONE]" else json.loads(body))
    return out


def _text(events: list[Any]) -> str:
    return "".join((e["choices"][0]["delta"].get("content") or "") for e in events if e != "[DONE]")


def _feed(guard: SseGuard, pieces: list[bytes]) -> list[tuple[bytes, bytes]]:
    """(what the client got after each piece, ...) then on_end's tail."""

    async def run() -> list[tuple[bytes, bytes]]:
        got = [(piece, await guard.on_chunk(piece)) for piece in pieces]
        return [*got, (b"", await guard.on_end())]

    return asyncio.run(run())


def test_prose_streams_without_hold_back() -> None:
    guard, seen = _guard()
    pieces = [
        _chunk(""),
        _chunk("Hello "),
        _chunk("world, "),
        _chunk("fine."),
        _chunk(None, "stop"),
    ]
    steps = _feed(guard, [*pieces, b"data: [DONE]\n\n"])
    assert all(sent == got for sent, got in steps[:-1])  # every event passes as it comes
    assert seen == []


def test_pattern_split_across_chunks_is_caught_before_any_part_is_sent() -> None:
    guard, seen = _guard()
    pieces = [
        _chunk(""),
        _chunk("Sure! "),
        _chunk("<scr"),
        _chunk("ipt>alert(1)</scr"),
        _chunk("ipt>"),
    ]
    steps = _feed(guard, [*pieces, _chunk(None, "stop"), b"data: [DONE]\n\n"])
    client = b"".join(got for _, got in steps)
    events = _events(client)
    assert _text(events) == "Sure! Sorry, I can't help with that."
    assert b"<scr" not in client
    assert events[-2]["choices"][0]["finish_reason"] == "content_filter"
    assert events[-2]["id"] == "c1" and events[-1] == "[DONE]"
    assert client.count(b"[DONE]") == 1
    assert seen and seen[0].rule == "unsafe-markup/script-tag"


def test_split_events_and_crlf_framing() -> None:
    guard, _ = _guard()
    raw = _chunk("ok ") + _chunk("<img src=x onerr") + _chunk("or=alert(1)>")
    raw = raw.replace(b"\n", b"\r\n")
    pieces = [raw[i : i + 7] for i in range(0, len(raw), 7)]
    client = b"".join(got for _, got in _feed(guard, pieces))
    assert _text(_events(client)) == "ok Sorry, I can't help with that."


def test_code_span_closed_later_is_not_a_violation() -> None:
    guard, seen = _guard()
    pieces = [_chunk("Use `<script"), _chunk(">"), _chunk("` tags."), _chunk(None, "stop")]
    client = b"".join(got for _, got in _feed(guard, pieces))
    assert _text(_events(client)) == "Use `<script>` tags."
    assert seen == []


def test_monitor_records_once_and_passes() -> None:
    guard, seen = _guard(action="monitor")
    pieces = [_chunk("<b onclick=x()>"), _chunk(" more"), _chunk(" text"), _chunk(None, "stop")]
    client = b"".join(got for _, got in _feed(guard, pieces))
    assert _text(_events(client)) == "<b onclick=x()> more text"
    assert [v.hits for v in seen] == [(("unsafe-markup/event-handler", "monitor"),)]


def test_max_chars_ends_the_stream() -> None:
    guard, _ = _guard(max_chars=8)
    client = b"".join(got for _, got in _feed(guard, [_chunk("12345 "), _chunk("67890")]))
    events = _events(client)
    assert _text(events) == "12345 Sorry, I can't help with that."
    assert events[-2]["choices"][0]["finish_reason"] == "content_filter"


def test_anthropic_stream_ends_with_refusal() -> None:
    guard, _ = _guard()

    def ev(kind: str, **body: Any) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **body})}\n\n".encode()

    text = {"type": "text_delta"}
    pieces = [
        ev("message_start", message={"id": "m"}),
        ev("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        ev("content_block_delta", index=0, delta={**text, "text": "Hi <ifr"}),
        ev("content_block_delta", index=0, delta={**text, "text": "ame src=//x>"}),
    ]
    client = b"".join(got for _, got in _feed(guard, pieces))
    kinds = [line[7:] for line in client.decode().splitlines() if line.startswith("event: ")]
    assert kinds[-4:] == [
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert b'"stop_reason":"refusal"' in client and b"<ifr" not in client


def _first_trigger_by_character(tail: str, start: int) -> int:
    """The definition, one character at a time (what ``_first_trigger`` did before it
    skipped to the candidate characters)."""
    end = len(tail)
    for i in range(start, end):
        c, nxt = tail[i], tail[i + 1] if i + 1 < end else ""
        if c in "<`\\" or (c == "!" and nxt in ("", "[")):
            return i
        if c == "[":
            close = tail.find("]", i)
            if close < 0 or close + 1 >= end or tail[close + 1] in "([":
                return i
        if c == "&" and (nxt == "" or nxt == "#" or nxt.isalpha()):
            return i
        if c == "%" and (nxt == "" or nxt in "0123456789abcdefABCDEFu"):
            return i
    return end


@settings(max_examples=600, deadline=None)
@given(st.text(alphabet="ab1 <`\\![]()&#%fé\n", max_size=40), st.integers(0, 45))
def test_first_trigger_is_its_definition(tail: str, start: int) -> None:
    assert _first_trigger(tail, start) == _first_trigger_by_character(tail, start)


def test_an_event_of_several_data_lines_is_read_whole() -> None:
    guard, seen = _guard()
    body = json.dumps({**HEAD, "choices": [{"index": 0, "delta": {"content": "<scr"}}]})
    cut = body.index('"object"')  # between two members: the joined lines are the JSON
    split = f"data: {body[:cut]}\ndata: {body[cut:]}\n\n".encode()
    rest = _chunk("ipt>alert(1)</script>", "stop")
    out = b"".join(b for _, b in _feed(guard, [split, rest, b"data: [DONE]\n\n"]))
    assert "<script" not in _text(_events(out))
    assert seen and seen[0].action == "replace"
