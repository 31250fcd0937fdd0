"""Asking an OpenAI-compatible upstream for stream usage, and hiding it again.

A streamed chat or completion carries token counts only when the client asked for them
(``stream_options.include_usage``). Without them the gateway could only estimate, so on LLM
routes it adds the option itself and removes what the client did not ask for from the
answer: the final usage-only event (``"choices": []``). The ``"usage": null`` field that
OpenAI then puts on every other chunk is part of the chunk schema and is left as it is.
Only the OpenAI paths (``.../chat/completions``, ``.../completions``) are touched: other APIs
(Anthropic's streams carry usage anyway) would refuse an unknown field.
"""

from __future__ import annotations

import json
from typing import Any

OPENAI_PATHS = ("/chat/completions", "/completions")
_STREAM = b'"stream"'
MAX_EVENT = 1024 * 1024


UNREAD: Any = object()
"""Default of ``wants_injection``'s ``doc``: no stage decoded the body."""


def wants_injection(path: str, body: bytes, doc: Any = UNREAD) -> bytes | None:
    """The body with ``include_usage`` added, for a streamed OpenAI request without it.

    ``doc`` is ``json.loads(body)`` when a stage already decoded it (e.g. for the input
    guardrail): a request that is not streamed is then told apart without a scan of the body
    (most of this function's cost); ``doc`` itself is never modified."""
    if not path.endswith(OPENAI_PATHS):
        return None
    if doc is not UNREAD and (not isinstance(doc, dict) or doc.get("stream") is not True):
        return None
    if _STREAM not in body:
        return None
    if doc is UNREAD:
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
    # A copy: the decoded document may be shared with the stages that decoded it.
    doc = {**doc, "stream_options": {**options, "include_usage": True}}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def _usage_only(event: bytes) -> bool:
    """True for an OpenAI chunk that carries usage and no choices."""
    if b'"usage"' not in event or b'"choices"' not in event:
        return False
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                doc = json.loads(line[5:])
            except ValueError:
                return False
            return isinstance(doc, dict) and doc.get("choices") == [] and bool(doc.get("usage"))
    return False


class UsageEventStripper:
    """Drops the usage-only events of a stream, passing everything else on as it comes
    (only an event split across chunks is held until its end arrives)."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        """What of ``chunk`` may go to the client now."""
        data = self._held + chunk if self._held else chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            if len(data) > MAX_EVENT:  # not an event stream we understand: stop interfering
                self._held = b""
                return data
            self._held = data
            return b""
        complete, self._held = data[: cut + 2], data[cut + 2 :]
        if b'"usage"' not in complete:
            return complete
        events = complete.split(b"\n\n")
        return b"\n\n".join(e for e in events[:-1] if not _usage_only(e)) + b"\n\n"

    def end(self) -> bytes:
        """Whatever was held when the stream ended."""
        held, self._held = self._held, b""
        return b"" if _usage_only(held) else held
