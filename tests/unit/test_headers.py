"""Header hygiene and request ids."""

from __future__ import annotations

from gateway.headers import (
    connection_tokens,
    headers_size,
    is_hop_by_hop,
    request_id_from,
    response_headers,
)


def test_hop_by_hop_and_proxy_prefix() -> None:
    for name in [
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-connection",
    ]:
        assert is_hop_by_hop(name, frozenset())
    assert not is_hop_by_hop(b"content-type", frozenset())
    assert is_hop_by_hop(b"x-foo", frozenset({b"x-foo"}))


def test_connection_tokens() -> None:
    headers = [(b"connection", b"keep-alive, X-Foo"), (b"connection", b"x-bar")]
    assert connection_tokens(headers) == {b"keep-alive", b"x-foo", b"x-bar"}


def test_response_headers_strip_hop_by_hop_and_named() -> None:
    raw = (
        (b"Content-Type", b"text/plain"),
        (b"Connection", b"close, X-Secret"),
        (b"X-Secret", b"1"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    )
    assert response_headers(raw) == [
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]


def test_request_id_sane_kept_else_generated() -> None:
    assert request_id_from(b"abc-123_X.y") == "abc-123_X.y"
    for bad in [None, b"", b"a b", b"x" * 129, b"<script>", b"id\r\nx: 1"]:
        rid = request_id_from(bad)
        assert len(rid) == 32 and rid != bad
    assert request_id_from(b"x" * 128) == "x" * 128


def test_headers_size() -> None:
    assert headers_size([(b"a", b"bc")]) == 7
