"""Streaming answers (SSE): deltas checked as they pass, with a bounded hold-back window.

Events are forwarded whole and unchanged. Each text delta is checked on arrival together with
the held text and up to ``CONTEXT`` characters already sent, so a pattern split across chunks
(``<scr`` + ``ipt>``) is caught as soon as its last piece arrives. Events whose text could
begin markup (from the first ``<``, backtick, ``\\``, ``![``, unfinished ``[..](..)``, ``&#``
or ``%xx`` in the last ``stream_holdback`` characters) are held back until more text has
arrived, so the start of a construct is not sent before it is known to be harmless; plain
prose is not held at all (no added time to first token). A match that a still-open code span
may yet turn into code waits for the span to close (bounded).

On a violation (``replace`` or ``block``) nothing more is forwarded: one final well-formed
event carries the fallback (OpenAI: ``finish_reason: content_filter``, then ``data: [DONE]``;
Anthropic: a text delta, ``content_block_stop``, ``stop_reason: refusal``, ``message_stop``)
and the rest of the upstream stream is dropped. ``monitor`` only records (each rule once).
Patterns longer than the hold-back may have their beginning sent, never their end.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.guard.answer import final_events
from gateway.guard.engine import Verdict
from gateway.guard.markup import strip_code
from gateway.guard.output import AnswerChecker, worst
from gateway.llm.usage import decode_json
from gateway.text import normalise

#: Characters of already sent text re-checked with each event (longest match guaranteed).
CONTEXT = 512
#: Longest single event accepted; a stream with no event boundary in this many bytes ends.
MAX_EVENT = 1 << 20
_ALWAYS = frozenset("<`\\")
# The characters that can begin markup at all: only they are looked at one by one (in C,
# ~1 µs for a 64-character hold-back, against ~5 µs for a Python loop over every character).
_CANDIDATE = re.compile(r"[<`\\!\[&%]")


def _first_trigger(tail: str, start: int) -> int:
    """Index of the first character from ``start`` that may begin markup: ``<``, a backtick,
    ``\\``, ``![``, an unfinished ``[...](...)``, ``&`` before ``#`` or a letter, ``%`` before
    a hex digit (a character at the very end counts when what follows could make it one)."""
    end = len(tail)
    found = _CANDIDATE.search(tail, start)
    while found is not None:
        i = found.start()
        c = tail[i]
        nxt = tail[i + 1] if i + 1 < end else ""
        if c in _ALWAYS:
            return i
        if c == "!" and nxt in ("", "["):
            return i
        if c == "[":
            close = tail.find("]", i)
            if close < 0 or close + 1 >= end or tail[close + 1] in "([":
                return i
        if c == "&" and (nxt == "" or nxt == "#" or nxt.isalpha()):
            return i
        if c == "%" and (nxt == "" or nxt in "0123456789abcdefABCDEFu"):
            return i
        found = _CANDIDATE.search(tail, i + 1)
    return end


def _open_span(text: str) -> bool:
    """Whether the last line of ``text`` has an unclosed inline code span."""
    line = text[text.rfind("\n") + 1 :]
    return line.count("`") % 2 == 1 and not line.lstrip().startswith(("```", "~~~"))


@dataclass(slots=True)
class _Event:
    raw: bytes
    texts: dict[int, str]


@dataclass(slots=True)
class _Choice:
    sent: str = ""
    """The last CONTEXT-ish characters already released."""
    fence: bool = False
    """Whether a code fence is open where ``sent`` begins."""
    total: int = 0


@dataclass(slots=True)
class _State:
    buffer: bytes = b""
    held: list[_Event] = field(default_factory=list)
    choices: dict[int, _Choice] = field(default_factory=dict)
    template: dict[str, Any] = field(default_factory=dict)
    anthropic: bool = False
    done: bool = False
    seen: set[str] = field(default_factory=set)


Recorder = Callable[[Verdict], None]


class SseGuard:
    """The body filter of one streamed answer (not buffered)."""

    buffer = False

    def __init__(self, checker: AnswerChecker, on_verdict: Recorder) -> None:
        self.checker = checker
        self.on_verdict = on_verdict
        self.holdback = checker.cfg.stream_holdback
        self.s = _State()

    @property
    def finished(self) -> bool:
        """True once the stream was stopped: the gateway stops reading the upstream."""
        return self.s.done

    async def on_chunk(self, chunk: bytes) -> bytes:
        """Parse whole events out of ``chunk``; return what may be sent now."""
        s = self.s
        if s.done:
            return b""
        data = s.buffer + chunk
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        out: list[bytes] = []
        start = 0
        while not s.done:
            end = data.find(b"\n\n", start)
            if end < 0:
                break
            out.append(self._event(data[start : end + 2]))
            start = end + 2
        s.buffer = b"" if s.done else data[start:]
        if len(s.buffer) > MAX_EVENT:  # no event boundary in sight: it cannot be checked
            if self.checker.cfg.action == "monitor":
                self._record_once(Verdict("monitor", "unreadable", (("unreadable", "monitor"),)))
                out.append(s.buffer)
                s.buffer = b""
            else:
                out.append(
                    self._stop(Verdict("block", "unreadable", (("unreadable", "block"),)), 0)
                )
        return b"".join(out)

    async def on_end(self) -> bytes:
        """The upstream ended: check and release whatever is still held (an unterminated last
        event is checked like the others)."""
        s = self.s
        out = b""
        if not s.done and s.buffer.strip():
            last, s.buffer = s.buffer.rstrip(b"\n") + b"\n\n", b""
            out = self._event(last)
        if s.done:
            return out
        return out + self._flush()

    def _event(self, raw: bytes) -> bytes:
        if raw.startswith(b"data:") and raw.find(b"\n") == len(raw) - 2:
            payload = raw[5:-2].lstrip(b" ")  # the usual event: one data line
        else:
            payload = b"\n".join(
                line[5:].lstrip(b" ") for line in raw.split(b"\n") if line.startswith(b"data:")
            )
        texts, final = self._texts(payload)
        if texts is None:
            if not final:
                return self._queue(raw)
            flushed = self._flush()
            return flushed if self.s.done else flushed + raw
        for index, text in texts.items():
            self.s.choices.setdefault(index, _Choice()).total += len(text)
        self.s.held.append(_Event(raw, texts))
        return self._arrived(final)

    def _texts(self, payload: bytes) -> tuple[dict[int, str] | None, bool]:
        """The text deltas of one event by choice index (None: no text), and whether the
        event ends a choice or the stream (it must follow every held event)."""
        if payload == b"[DONE]":
            return None, True
        try:
            obj = decode_json(payload) if payload.startswith(b"{") else None
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            return None, False
        kind = obj.get("type")
        if kind is not None:  # Anthropic
            self.s.anthropic = True
            delta = obj.get("delta")
            if kind == "content_block_delta" and isinstance(delta, dict):
                text = delta.get("text")
                return ({0: text} if isinstance(text, str) and text else None), False
            if kind == "content_block_start":
                self.s.template["index"] = obj.get("index", 0)
            return None, kind in ("content_block_stop", "message_delta", "message_stop")
        self.s.template = {k: obj[k] for k in ("id", "object", "created", "model") if k in obj}
        texts: dict[int, str] = {}
        final = not obj.get("choices")
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if isinstance(text, str) and text:
                texts[int(choice.get("index", 0))] = text
            final = final or choice.get("finish_reason") is not None
        return (texts or None), final

    def _queue(self, raw: bytes) -> bytes:
        if not self.s.held:
            return raw
        self.s.held.append(_Event(raw, {}))
        return b""

    def _arrived(self, final: bool = False) -> bytes:
        """Check all held text with the text sent before it; stop, wait, or release."""
        s = self.s
        monitored: Verdict | None = None
        for index, choice in s.choices.items():
            held = "".join(e.texts.get(index, "") for e in s.held)
            if not held:
                continue
            found = self._check(choice, held)
            if found is None:
                continue
            if found.action == "monitor":
                monitored = found if monitored is None else worst(monitored, found)
                continue
            if not final and _open_span(choice.sent + held) and len(held) <= 8 * self.holdback:
                return b""  # a code span still open before the match may yet close over it
            return self._stop(found, index)
        if monitored is not None:
            self._record_once(monitored)
        return self._emit(len(s.held) if final else self._releasable())

    def _flush(self) -> bytes:
        return self._arrived(final=True)

    def _releasable(self) -> int:
        """How many held events need no more look-ahead: those before the first character in
        the last ``stream_holdback`` that could begin a construct the rules look for."""
        held = self.s.held
        tail = "".join("".join(e.texts.values()) for e in held)
        keep_from = _first_trigger(tail, max(0, len(tail) - self.holdback))
        count, chars = 0, 0
        for event in held:
            size = sum(len(t) for t in event.texts.values())
            if chars + size > keep_from:
                break
            chars += size
            count += 1
        return count

    def _emit(self, count: int) -> bytes:
        s = self.s
        out, s.held = s.held[:count], s.held[count:]
        for index, choice in s.choices.items():
            self._advance(choice, "".join(e.texts.get(index, "") for e in out))
        return b"".join(e.raw for e in out)

    def _check(self, choice: _Choice, held: str) -> Verdict | None:
        window = choice.sent + held
        if self.checker.cfg.skip_code:
            window = strip_code(window, choice.fence)[0]
        long = self.checker.too_long(choice.total)
        found = self.checker.scan_view(normalise(window, self.checker.decode))
        if long is None or found is None:
            return long or found
        return worst(long, found)

    def _advance(self, choice: _Choice, released: str) -> None:
        sent = choice.sent + released
        if len(sent) > CONTEXT + 128:
            cut = sent.rfind("\n", 0, len(sent) - CONTEXT) + 1 or len(sent) - CONTEXT
            choice.fence = strip_code(sent[:cut], choice.fence)[1]
            sent = sent[cut:]
        choice.sent = sent

    def _record_once(self, verdict: Verdict) -> None:
        fresh = tuple(h for h in verdict.hits if h[0] not in self.s.seen)
        if fresh:
            self.s.seen.update(h[0] for h in fresh)
            self.on_verdict(Verdict(verdict.action, verdict.rule, fresh))

    def _stop(self, verdict: Verdict, index: int) -> bytes:
        self.on_verdict(verdict)
        self.s.done = True
        self.s.held = []
        return final_events(self.s.template, self.s.anthropic, index, self.checker.fallback)
