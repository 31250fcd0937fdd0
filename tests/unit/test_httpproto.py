"""The HTTP protocol's pieces that need no socket: the error bytes and the policy's bounds.
The protocol itself is tested over TCP in tests/hardening/."""

from __future__ import annotations

import json

import pytest

from gateway.errors import Deny
from gateway.httpproto import ConnectionLimits, error_bytes, limits_of
from gateway.policy import PolicyError, load_policy_text

BASE = "version: 1\nupstream: {url: http://127.0.0.1:8000}\n"


def test_error_bytes_are_one_closing_json_answer() -> None:
    data = error_bytes(Deny(408, "request_timeout", "late", ((b"retry-after", b"1"),)), "rid-1")
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 408 Request Timeout"
    assert b"connection: close" in lines and b"retry-after: 1" in lines
    assert b"content-length: %d" % len(body) in lines
    assert json.loads(body) == {
        "error": {"type": "request_timeout", "message": "late", "request_id": "rid-1"}
    }


def test_defaults_and_values_come_from_the_policy() -> None:
    assert limits_of(load_policy_text(BASE)) == ConnectionLimits(
        max_connections=4096,
        max_header_bytes=16384,
        max_header_count=100,
        header_read_timeout=10.0,
        body_read_timeout=30.0,
    )
    policy = load_policy_text(
        BASE + "max_connections: 10\nmax_header_count: 5\nheader_read_timeout: 250ms\n"
        "body_read_timeout: 2s\nmax_header_bytes: 1KiB\n"
    )
    assert limits_of(policy) == ConnectionLimits(10, 1024, 5, 0.25, 2.0)
    assert limits_of(policy) is limits_of(policy)  # computed once per policy


@pytest.mark.parametrize(
    "line",
    [
        "max_connections: 0",
        "max_in_flight: -1",
        "max_header_count: 0",
        "max_in_flight: x",
        "header_read_timeout: 0s",
        "body_read_timeout: 0ms",
    ],
)
def test_bad_bounds_are_policy_errors(line: str) -> None:
    with pytest.raises(PolicyError):
        load_policy_text(BASE + line + "\n")
