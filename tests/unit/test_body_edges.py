"""Bodies that are valid JSON but odd (lone surrogates, scalar documents) never crash a check."""

from __future__ import annotations

import pytest

from gateway.guard.extract import BadBody, parse_body
from gateway.text import fold, normalise


@pytest.mark.parametrize(
    "body",
    [b'{"a":"x\\ud800y"}', b'"\\udc00"', b'{"\\uDBFF":1}', b'[[{"b":["\\ud800"]}]]'],
)
def test_lone_surrogates_are_a_bad_body(body: bytes) -> None:
    with pytest.raises(BadBody, match="not valid Unicode"):
        parse_body(body, 32)


def test_surrogate_pairs_and_plain_escapes_pass() -> None:
    assert parse_body(b'{"a":"\\ud83d\\ude00 \\u00e9"}', 32) == {"a": "\U0001f600 \u00e9"}


def test_fold_replaces_lone_surrogates_instead_of_raising() -> None:
    assert fold("ign\ud800ore \u00e9") == "ign\ufffd\ufffd\ufffdore \u00e9"
    assert "ign" in normalise("IGN\udfffORE", ("url", "base64"))


@pytest.mark.parametrize("body", [b"0", b"true", b"null", b'"text"', b"1.5e300"])
def test_scalar_documents_parse(body: bytes) -> None:
    # these were a TypeError (a 500) before: the depth walk iterated the scalar
    parse_body(body, 32)
