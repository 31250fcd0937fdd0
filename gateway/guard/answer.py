"""Where answer text is in a JSON response, and how a fallback takes its place.

An :class:`Answer` is one answer the client will show: an OpenAI choice (``message.content``
as a string or text parts, or completions ``text``), the text blocks of an Anthropic message,
or one string at a ``json_paths`` path. ``replace`` puts the fallback in the same place so the
answer keeps its schema: OpenAI's ``finish_reason`` becomes ``content_filter``, Anthropic's
``stop_reason`` becomes ``refusal`` and the other text blocks are dropped.
:func:`final_events` ends a stream the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.guard.extract import Slot, Step, path_slots

OPENAI_FILTERED = "content_filter"
ANTHROPIC_FILTERED = "refusal"


@dataclass(slots=True)
class Answer:
    """The text slots of one answer and where its stop reason lives."""

    slots: list[Slot]
    finish: dict[str, Any] | None = None
    """The object whose ``finish_reason`` (OpenAI) or ``stop_reason`` (Anthropic) is set."""
    blocks: list[Any] | None = field(default=None)
    """Anthropic: the ``content`` list, so extra text blocks can be dropped."""

    @property
    def text(self) -> str:
        """The answer's text as the client shows it."""
        if len(self.slots) == 1:
            return self.slots[0].text
        return "".join(s.text for s in self.slots)

    def replace(self, fallback: str) -> None:
        """Put ``fallback`` in place of the answer's text, keeping the schema."""
        if not self.slots:
            return
        first, rest = self.slots[0], self.slots[1:]
        first.set(fallback)
        if self.blocks is not None:
            drop = {id(s.parent) for s in rest}
            self.blocks[:] = [b for b in self.blocks if id(b) not in drop]
            if self.finish is not None:
                self.finish["stop_reason"] = ANTHROPIC_FILTERED
            return
        for slot in rest:
            slot.set("")
        if self.finish is not None:
            self.finish["finish_reason"] = OPENAI_FILTERED


def _openai(doc: dict[str, Any]) -> list[Answer]:
    answers: list[Answer] = []
    for choice in doc.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        msg = choice.get("message")
        slots: list[Slot] = []
        if isinstance(msg, dict):
            content = msg.get("content")
            if isinstance(content, str):
                slots.append(Slot(msg, "content", content))
            elif isinstance(content, list):
                slots.extend(
                    Slot(p, "text", p["text"])
                    for p in content
                    if isinstance(p, dict) and isinstance(p.get("text"), str)
                )
        elif isinstance(choice.get("text"), str):
            slots.append(Slot(choice, "text", choice["text"]))
        if slots:
            answers.append(Answer(slots, choice))
    return answers


def _anthropic(doc: dict[str, Any]) -> list[Answer]:
    blocks = doc.get("content")
    if not isinstance(blocks, list):
        return []
    slots = [
        Slot(b, "text", b["text"])
        for b in blocks
        if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
    ]
    return [Answer(slots, doc, blocks)] if slots else []


def locate(doc: Any, fmt: str, paths: Sequence[tuple[Step, ...]]) -> list[Answer]:
    """The answers in a JSON response for ``format`` (``auto`` tells OpenAI from Anthropic)."""
    if fmt == "json_paths":
        return [Answer([slot]) for slot in path_slots(doc, paths)]
    if not isinstance(doc, dict):
        return []
    if fmt == "openai" or (fmt == "auto" and isinstance(doc.get("choices"), list)):
        return _openai(doc)
    if fmt == "anthropic" or (fmt == "auto" and doc.get("type") == "message"):
        return _anthropic(doc)
    return []


def _sse(obj: Any, event: str | None = None) -> bytes:
    data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return (f"event: {event}\n" if event else "").encode() + f"data: {data}\n\n".encode()


def final_events(template: dict[str, Any], anthropic: bool, index: int, fallback: str) -> bytes:
    """The events that end a stream with ``fallback`` as the last text."""
    if anthropic:
        block = int(template.get("index", 0))
        return b"".join(
            [
                _sse(
                    {
                        "type": "content_block_delta",
                        "index": block,
                        "delta": {"type": "text_delta", "text": fallback},
                    },
                    "content_block_delta",
                ),
                _sse({"type": "content_block_stop", "index": block}, "content_block_stop"),
                _sse(
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": "refusal", "stop_sequence": None},
                        "usage": {"output_tokens": 0},
                    },
                    "message_delta",
                ),
                _sse({"type": "message_stop"}, "message_stop"),
            ]
        )
    chunk = dict(template)
    if str(chunk.get("object", "")).startswith("text_completion"):
        choice: dict[str, Any] = {"index": index, "text": fallback, "logprobs": None}
    else:
        chunk.setdefault("object", "chat.completion.chunk")
        choice = {"index": index, "delta": {"content": fallback}, "logprobs": None}
    choice["finish_reason"] = "content_filter"
    chunk["choices"] = [choice]
    return _sse(chunk) + b"data: [DONE]\n\n"
