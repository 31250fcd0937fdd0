"""Route matching: prefix with a path boundary, methods, first match wins."""

from __future__ import annotations

import pytest

from gateway.routes import OTHER, CompiledRoute, Router


def route(name: str, prefix: str, methods: set[str] | None = None) -> CompiledRoute:
    return CompiledRoute(
        name, prefix, frozenset(methods) if methods else None, None, None, None, None
    )


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/chat", True),
        ("/v1/chat/x", True),
        ("/v1/chat/", True),
        ("/v1/chatx", False),
        ("/v1", False),
        ("/other", False),
    ],
)
def test_prefix_boundary(path: str, expected: bool) -> None:
    assert route("c", "/v1/chat").matches("GET", path) is expected


def test_trailing_slash_prefix_and_root() -> None:
    assert route("a", "/api/").matches("GET", "/api/x")
    assert not route("a", "/api/").matches("GET", "/apix")
    assert route("r", "/").matches("GET", "/anything")


def test_methods_and_first_match_wins() -> None:
    chat = route("chat", "/v1/chat", {"POST"})
    anyv1 = route("v1", "/v1")
    fallback = route(OTHER, "/")
    router = Router([chat, anyv1], fallback)
    assert router.match("POST", "/v1/chat").name == "chat"
    assert router.match("GET", "/v1/chat").name == "v1"
    assert router.match("GET", "/health").name == OTHER
