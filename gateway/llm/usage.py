"""LLM usage: what a request may cost before the call, and what it did cost after it.

* :func:`estimate_request` reads an OpenAI/Anthropic-style JSON request: the model, the prompt
  size (body bytes / 3, on the high side for English and for CJK alike) and the completion
  ceiling (``max_completion_tokens``, ``max_tokens`` or ``max_output_tokens``, times ``n``).
* :func:`usage_from_json` reads the ``usage`` object of an answer: OpenAI chat/completions
  (``prompt_tokens``/``completion_tokens``), OpenAI responses and Anthropic
  (``input_tokens``/``output_tokens``), and Anthropic's ``message_start``/``message_delta``
  stream events.
* :class:`JsonUsage` and :class:`SseUsage` take an answer's body chunk by chunk (a plain JSON
  document, or a server-sent-events stream scanned line by line for ``data:`` lines that
  carry ``"usage"``) and give the usage at the end.
* :class:`Prices` turns tokens into USD with the policy's ``cost`` table.
* :func:`decode_json` is ``json.loads`` for a body, quicker on the usual JSON object.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from gateway.policy.sections import CostConfig, ModelPrice

BYTES_PER_TOKEN = 3
MAX_JSON_ANSWER = 4 * 1024 * 1024
MAX_SSE_LINE = 1024 * 1024
_USAGE = b'"usage"'
_JSON_SPACE = " \t\n\r"
_raw_decode = json.JSONDecoder().raw_decode

ANSWER_DOC = "usage.answer_doc"
"""``ctx.notes`` key of ``(body, doc)``: a JSON answer as a response stage passed it on and
its decoded document, left by a stage that decodes the answer anyway (the output guardrail)
so that :class:`JsonUsage` need not decode it again. Whoever leaves it removes it by the end
of the request: notes go to the access log."""


@dataclass(slots=True, frozen=True)
class RequestEstimate:
    """The most a request is expected to use."""

    model: str | None
    prompt_tokens: int
    max_tokens: int

    @property
    def tokens(self) -> int:
        """Prompt plus completion ceiling."""
        return self.prompt_tokens + self.max_tokens


class Tokens(NamedTuple):
    """Usage reported by the model service (a tuple: made for every answer, and a frozen
    dataclass takes twice as long to make)."""

    input: int
    output: int
    model: str | None = None


def estimate_request(
    body: bytes, default_max_tokens: int, decode: Callable[[bytes], Any] | None = None
) -> RequestEstimate | None:
    """The estimate for a JSON object body; None when the body is not one (no LLM call).
    ``decode`` decodes ``body`` (a request's cached :meth:`RequestContext.json_body`);
    :func:`decode_json` by default."""
    if body[:1] != b"{" and body.lstrip()[:1] != b"{":
        return None
    try:
        doc = (decode or decode_json)(body)
    except (ValueError, RecursionError):
        return None
    return _estimate(doc, len(body), default_max_tokens)


def decode_json(body: bytes) -> Any:
    """``json.loads(body)``: the same document or the same error, a third quicker for a short
    UTF-8 JSON object (``json.loads`` detects the encoding and runs two whitespace regexes,
    which a body starting with ``{`` does not need)."""
    if body[:1] == b"{" and body[1:2] != b"\x00":  # json.detect_encoding would say UTF-8
        text = body.decode("utf-8", "surrogatepass")
        doc, end = _raw_decode(text)
        if end == len(text) or not text[end:].strip(_JSON_SPACE):
            return doc
    return json.loads(body)  # other encodings, and the exact error for extra data


def _estimate(doc: Any, size: int, default_max_tokens: int) -> RequestEstimate | None:
    if not isinstance(doc, dict):
        return None
    model = doc.get("model")
    ceiling = default_max_tokens
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = doc.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            ceiling = value
            break
    n = doc.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and 1 < n <= 128:
        ceiling *= n
    prompt = -(-size // BYTES_PER_TOKEN)
    return RequestEstimate(model if isinstance(model, str) else None, prompt, ceiling)


def _count(obj: dict[str, Any], first: str, second: str) -> int | None:
    # Two names, spelt out: this runs for every answer and every usage event.
    value = obj.get(first)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    value = obj.get(second)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def usage_from_json(doc: Any) -> Tokens | None:
    """The usage in one decoded answer or stream event, if it carries any."""
    if not isinstance(doc, dict):
        return None
    model = doc.get("model")
    usage = doc.get("usage")
    message = doc.get("message")
    if usage is None and isinstance(message, dict):  # Anthropic message_start
        usage = message.get("usage")
        model = message.get("model", model)
    if not isinstance(usage, dict):
        return None
    inp = _count(usage, "prompt_tokens", "input_tokens")
    out = _count(usage, "completion_tokens", "output_tokens")
    if inp is None and out is None:
        return None
    return Tokens(inp or 0, out or 0, model if isinstance(model, str) else None)


def _merge(old: Tokens | None, new: Tokens) -> Tokens:
    # Stream events repeat or grow the counts (Anthropic's output_tokens are cumulative).
    if old is None:
        return new
    return Tokens(max(old.input, new.input), max(old.output, new.output), new.model or old.model)


class JsonUsage:
    """Collects a JSON answer (up to 4 MiB) and reads its usage at the end."""

    __slots__ = ("_parts", "_size")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        """Take the next piece of the body."""
        self._size += len(chunk)
        if self._size <= MAX_JSON_ANSWER:
            self._parts.append(chunk)

    def result(self, decoded: tuple[bytes, Any] | None = None) -> Tokens | None:
        """The answer's usage; None when absent, malformed or the answer was too large.
        ``decoded`` is a ``(body, doc)`` pair (see :data:`ANSWER_DOC`): ``doc`` is read
        instead of decoding the answer when the answer is exactly ``body``."""
        if self._size > MAX_JSON_ANSWER:
            return None
        body = b"".join(self._parts)  # of one part: that part itself, so `is` usually holds
        if body.find(_USAGE) < 0:  # `in` on bytes first raises and clears a TypeError
            return None
        if decoded is not None and (decoded[0] is body or decoded[0] == body):
            return usage_from_json(decoded[1])
        try:
            return usage_from_json(decode_json(body))
        except ValueError:
            return None


class SseUsage:
    """Scans an event stream for ``data:`` lines with usage; passes nothing through itself."""

    __slots__ = ("_parts", "_size", "_tokens")

    def __init__(self) -> None:
        self._parts: list[bytes] = []  # the line in progress
        self._size = 0
        self._tokens: Tokens | None = None

    def feed(self, chunk: bytes) -> None:
        """Take the next piece of the stream (lines may be split anywhere)."""
        cut = chunk.rfind(b"\n")
        if cut < 0:
            self._size += len(chunk)
            if self._size > MAX_SSE_LINE:  # no usage line is that long: drop it
                self._parts.clear()
                self._size = 0
            else:
                self._parts.append(chunk)
            return
        if self._parts:
            head = b"".join(self._parts)
            data, cut = head + chunk, cut + len(head)
        else:
            data = chunk
        tail = data[cut + 1 :]
        self._parts = [tail] if tail else []
        self._size = len(tail)
        if data.find(_USAGE, 0, cut) < 0:
            return
        for line in data[:cut].split(b"\n"):
            if line.startswith(b"data:") and _USAGE in line:
                self._take(line[5:])

    def _take(self, payload: bytes) -> None:
        try:
            tokens = usage_from_json(json.loads(payload))
        except ValueError:
            return
        if tokens is not None:
            self._tokens = _merge(self._tokens, tokens)

    def result(self) -> Tokens | None:
        """The usage seen in the stream (a last line without newline counts too)."""
        last = b"".join(self._parts)
        self._parts, self._size = [], 0
        if last.startswith(b"data:") and _USAGE in last:
            self._take(last[5:])
        return self._tokens


class Prices:
    """The ``cost`` table: USD for a number of tokens of a model."""

    def __init__(self, cfg: CostConfig | None) -> None:
        self.models: dict[str, ModelPrice] = dict(cfg.models) if cfg else {}
        self.default = cfg.default if cfg else None

    def of(self, model: str | None) -> ModelPrice | None:
        """The model's price, the default price, or None when there is neither."""
        if model is not None and model in self.models:
            return self.models[model]
        return self.default

    def cost(self, model: str | None, input_tokens: int, output_tokens: int) -> float:
        """USD for this usage (0 when no price applies)."""
        price = self.of(model)
        if price is None:
            return 0.0
        return (input_tokens * price.input_per_1k + output_tokens * price.output_per_1k) / 1000
