"""``decode_json`` is ``json.loads`` for a body: the same document, or the same error."""

from __future__ import annotations

import codecs
import gc
import json

import pytest

from gateway.context import RequestContext
from gateway.llm.usage import decode_json


@pytest.mark.parametrize(
    "body",
    [
        b"{}",
        b'{"a": [1, 2.5, -3e2, true, null, "x\\u00e9\\ud83d\\ude00"]}',
        b'{"a": 1}  \n\t\r',
        b'{"n": NaN, "i": -Infinity, "big": 123456789012345678901234567890}',
        b'{"lone": "\\ud800"}',
        '{"é": "ü"}'.encode(),
        b"{" + b'"k": "\xed\xa0\x80"' + b"}",  # an encoded surrogate: decoded with surrogatepass
        codecs.BOM_UTF8 + b'{"bom": 1}',
        '{"utf16": 1}'.encode("utf-16-le"),
        '{"utf16": 1}'.encode("utf-16"),
        '{"utf32": 1}'.encode("utf-32-le"),
        b"  {}",
        b"[1, 2]",
        b'"text"',
        b"12",
    ],
)
def test_decode_json_is_json_loads(body: bytes) -> None:
    want = json.loads(body)
    got = decode_json(body)
    assert json.dumps(got) == json.dumps(want) and type(got) is type(want)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b'{"a": 1} x',
        b'{"a": 1}{}',
        b'{"a": 1,}',
        b"{'a': 1}",
        b'{"a": "\xff"}',
        b"{\x00",
        b"{\x00\x00\x00",
        b"nope",
    ],
)
def test_decode_json_fails_like_json_loads(body: bytes) -> None:
    with pytest.raises(ValueError) as want:
        json.loads(body)
    with pytest.raises(ValueError) as got:
        decode_json(body)
    assert type(got.value) is type(want.value) and str(got.value) == str(want.value)
    ctx = RequestContext({}, "rid", None, "POST", "/x", "192.0.2.1", [])  # type: ignore[arg-type]
    ctx.body = body
    for _ in range(2):  # the first reader decodes, the next one gets the error kept
        with pytest.raises(ValueError) as again:
            ctx.json_body()
        assert type(again.value) is type(want.value) and str(again.value) == str(want.value)


def test_decode_json_too_deep_like_json_loads() -> None:
    deep = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    for decode in (json.loads, decode_json):
        with pytest.raises(RecursionError):
            decode(deep)
    ctx = RequestContext({}, "rid", None, "POST", "/x", "192.0.2.1", [])  # type: ignore[arg-type]
    ctx.body = deep
    for _ in range(2):
        with pytest.raises(RecursionError):
            ctx.json_body()


def test_a_body_that_is_not_json_fails_every_reader_and_leaves_no_cycle() -> None:
    # The error is kept on the context for the next reader; with its traceback it would
    # hold the frame that holds the context: a cycle for the garbage collector per request.
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            ctx = RequestContext({}, "rid", None, "POST", "/x", "192.0.2.1", [])  # type: ignore[arg-type]
            ctx.body = b'{"model": '
            for _ in range(2):
                with pytest.raises(json.JSONDecodeError, match="Expecting value"):
                    ctx.json_body()
            assert ctx.decoded_body("none") == "none"
            del ctx
        assert gc.collect() == 0
    finally:
        gc.enable()
