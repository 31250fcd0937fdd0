"""Where prompt text is in a request, as rewritable slots.

A :class:`Slot` is one string in the parsed body (or one query parameter) with the container
and key that hold it, so an action can rewrite it in place and the body be serialised again.

Presets: ``openai`` (chat ``messages[].content`` as a string or text parts, any role unless
``roles`` says otherwise, ``tool_calls[].function.arguments``, completions ``prompt``,
Responses ``input``/``instructions``) and ``anthropic`` (``system`` and ``messages[].content``
text and tool-result blocks). ``json_paths`` takes paths ``$.a.b``, ``$.a[0]``, ``$.a[*].b``,
``$['a b']`` and ``$.a.*``; every string at or under a path is a slot.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

Container = dict[str, Any] | list[Any]
Step = str | int | None
"""A path step: a key, an index, or None for every child (``*``)."""

_STEP = re.compile(
    r"\.([A-Za-z_][A-Za-z0-9_-]*)|\.\*|\[\*\]|\[(\d{1,6})\]|\['([^']*)'\]|\[\"([^\"]*)\"\]"
)


class BadBody(ValueError):
    """The body cannot be checked: not JSON, or nested too deep."""


@dataclass(slots=True)
class Slot:
    """One checked string: ``parent[key] == text`` until ``set`` changes it."""

    parent: Container
    key: str | int
    text: str

    def set(self, text: str) -> None:
        """Rewrite the string in its container."""
        self.parent[self.key] = text  # type: ignore[index]
        self.text = text


def check_path(path: str) -> None:
    """Raise ValueError when ``path`` is not a supported JSONPath."""
    compile_path(path)


def compile_path(path: str) -> tuple[Step, ...]:
    """``$.a[*].b`` → ``("a", None, "b")``; raises ValueError."""
    if not path.startswith("$"):
        raise ValueError(f"{path!r}: a path starts with $ (e.g. $.player_input)")
    steps: list[Step] = []
    pos = 1
    while pos < len(path):
        m = _STEP.match(path, pos)
        if m is None:
            raise ValueError(f"{path!r}: cannot read the path at {path[pos:]!r}")
        name, index, quoted1, quoted2 = m.groups()
        if index is not None:
            steps.append(int(index))
        elif name is not None or quoted1 is not None or quoted2 is not None:
            steps.append(name if name is not None else quoted1 if quoted1 is not None else quoted2)
        else:
            steps.append(None)
        pos = m.end()
    return tuple(steps)


def parse_body(body: bytes, max_depth: int, decode: Callable[[], Any] | None = None) -> Any:
    """The JSON document in ``body``; raises BadBody when invalid or deeper than ``max_depth``.
    ``decode`` gives the document when the body was decoded already (the request's cache)."""
    try:
        doc = decode() if decode is not None else json.loads(body)
    except (ValueError, RecursionError):
        raise BadBody("the request body is not valid JSON (or is nested too deep)") from None
    # A lone surrogate escape ("\ud800") is valid JSON but not text: nothing can encode it,
    # and a rule could be evaded by one inside a word. Only bodies with such an escape pay
    # for the string walk.
    # .find first: a C scan for the two bytes, where the regex engine walks the body
    # (``in`` on bytes tries an int first, raising and clearing a TypeError)
    strict = body.find(b"\\u") >= 0 and _SURROGATE_ESCAPE.search(body) is not None
    # Only containers are walked: a scalar document (``0``, ``true``) has no depth to check;
    # nor does one with fewer brackets (counted in C, strings included) than ``max_depth``.
    walk = isinstance(doc, dict | list) and (
        strict or body.count(b"{") + body.count(b"[") > max_depth
    )
    stack: list[tuple[Any, int]] = [(doc, 1)] if walk else []
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise BadBody(f"the request body is nested deeper than {max_depth} levels")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
        if strict:
            keys = node.keys() if isinstance(node, dict) else ()
            for text in (*keys, *children):
                if isinstance(text, str) and not _encodable(text):
                    raise BadBody("the request body has text that is not valid Unicode")
    if strict and isinstance(doc, str) and not _encodable(doc):
        raise BadBody("the request body has text that is not valid Unicode")
    return doc


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _strings(parent: Container, key: str | int) -> Iterator[Slot]:
    """Every string at ``parent[key]`` or nested under it."""
    stack: list[tuple[Container, str | int]] = [(parent, key)]
    while stack:
        p, k = stack.pop()
        value = p[k]  # type: ignore[index]
        if isinstance(value, str):
            yield Slot(p, k, value)
        elif isinstance(value, dict):
            stack.extend((value, ck) for ck in reversed(list(value)))
        elif isinstance(value, list):
            stack.extend((value, i) for i in reversed(range(len(value))))


def path_slots(doc: Any, paths: Sequence[tuple[Step, ...]]) -> list[Slot]:
    """Slots for compiled ``json_paths`` in ``doc``."""
    slots: list[Slot] = []
    root: list[Any] = [doc]
    for steps in paths:
        level: list[tuple[Container, str | int]] = [(root, 0)]
        for step in steps:
            nxt: list[tuple[Container, str | int]] = []
            for p, k in level:
                value = p[k]  # type: ignore[index]
                if isinstance(value, dict):
                    keys = list(value) if step is None else [step] if step in value else []
                    nxt.extend((value, key) for key in keys if isinstance(key, str))
                elif isinstance(value, list):
                    if step is None:
                        nxt.extend((value, i) for i in range(len(value)))
                    elif isinstance(step, int) and step < len(value):
                        nxt.append((value, step))
            level = nxt
        for p, k in level:
            slots.extend(_strings(p, k))
    return slots


def _text_parts(parent: dict[str, Any], key: str, kinds: frozenset[str]) -> Iterator[Slot]:
    """``parent[key]`` as a string, or the ``text`` of its parts whose ``type`` is in kinds."""
    content = parent.get(key)
    if isinstance(content, str):
        yield Slot(parent, key, content)
    elif isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind in kinds and isinstance(part.get("text"), str):
                yield Slot(part, "text", part["text"])
            elif kind == "tool_result":
                yield from _text_parts(part, "content", kinds)


_OPENAI_PARTS = frozenset({"text", "input_text"})
_ANTHROPIC_PARTS = frozenset({"text"})


def openai_slots(doc: Any, roles: frozenset[str] | None) -> list[Slot]:
    """Prompt slots of an OpenAI chat, completions or Responses request."""
    if not isinstance(doc, dict):
        return []
    slots: list[Slot] = []
    for field in ("messages", "input"):
        items = doc.get(field)
        if isinstance(items, str):
            slots.append(Slot(doc, field, items))
            continue
        for msg in items if isinstance(items, list) else ():
            if not isinstance(msg, dict) or (roles is not None and msg.get("role") not in roles):
                continue
            slots.extend(_text_parts(msg, "content", _OPENAI_PARTS))
            calls = msg.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    slots.append(Slot(fn, "arguments", fn["arguments"]))
    prompt = doc.get("prompt")
    if isinstance(prompt, str):
        slots.append(Slot(doc, "prompt", prompt))
    elif isinstance(prompt, list):
        slots.extend(Slot(prompt, i, p) for i, p in enumerate(prompt) if isinstance(p, str))
    if isinstance(doc.get("instructions"), str) and (roles is None or "system" in roles):
        slots.append(Slot(doc, "instructions", doc["instructions"]))
    return slots


def anthropic_slots(doc: Any, roles: frozenset[str] | None) -> list[Slot]:
    """Prompt slots of an Anthropic Messages request."""
    if not isinstance(doc, dict):
        return []
    slots: list[Slot] = []
    if roles is None or "system" in roles:
        slots.extend(_text_parts(doc, "system", _ANTHROPIC_PARTS))
    messages = doc.get("messages")
    for msg in messages if isinstance(messages, list) else ():
        if isinstance(msg, dict) and (roles is None or msg.get("role") in roles):
            slots.extend(_text_parts(msg, "content", _ANTHROPIC_PARTS))
    return slots


def query_slots(pairs: list[list[str]], names: frozenset[str]) -> list[Slot]:
    """Slots of the chosen query parameters (``*``: every name and value)."""
    every = "*" in names
    slots: list[Slot] = []
    for pair in pairs:
        if every:
            slots.append(Slot(pair, 0, pair[0]))
        if every or pair[0] in names:
            slots.append(Slot(pair, 1, pair[1]))
    return slots
