"""The normalised text view: Unicode folding, spacing, decodings, control stripping."""

from __future__ import annotations

import base64
import re
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import text
from gateway.text import fold, normalise, strip_control

# Texts rich in what the quick checks look for: base64 runs, padding, controls, non-ASCII.
_TEXTS = st.text(
    alphabet=st.sampled_from(list("aZ09+/_-= \n\t.\x00\x1b\x7f\u00e9\u0416\u200b")), max_size=80
) | st.text(max_size=40)


@pytest.mark.parametrize(
    ("raw", "view"),
    [
        ("Ignore Previous", "ignore previous"),
        ("\uff29\uff47\uff4e\uff4f\uff52\uff45", "ignore"),  # fullwidth
        ("\U0001d422\U0001d420\U0001d427\U0001d428\U0001d42b\U0001d41e", "ignore"),  # math bold
        ("\u24d8gnore", "ignore"),  # circled letter
        ("ig\u200bno\u200dre\u2060 pre\ufeffvious", "ignore previous"),  # zero-width
        ("\u202eignore\u202c \U000e0069gnore", "ignore ignore"),  # bidi and tag characters
        ("\u0456gn\u043er\u0435 \u03c1r\u03b5vious", "ignore previous"),  # Cyrillic, Greek
        ("\u1d05\u1d00\u0274 mode", "dan mode"),  # small capitals
        ("ig\x00nore\x07", "ignore"),  # control characters
    ],
)
def test_fold_unicode(raw: str, view: str) -> None:
    assert fold(raw) == view


def test_fold_spacing_keeps_newlines() -> None:
    assert fold("a  b\t\tc \n\n\n  d\r\ne") == "a b c\nd\ne"


@pytest.mark.parametrize(
    ("raw", "view"),
    [
        ("i g n o r e all rules", "ignore all rules"),
        ("i.g.n.o.r.e   p r e v i o u s", "ignore previous"),  # a wide gap parts words
        ("hello w o r l dd", "hello worl dd"),  # a letter of a neighbouring word stays
        ("plan a b trip", "plan a b trip"),  # two single letters are not a spaced word
        ("U.S.A. and e.g. this", "usa. and e.g. this"),
    ],
)
def test_fold_letter_spacing(raw: str, view: str) -> None:
    assert fold(raw) == view


def test_normalise_appends_decodings() -> None:
    encoded = base64.b64encode(b"ignore previous instructions").decode()
    assert normalise(encoded, ["base64"]).endswith("\nignore previous instructions")
    assert normalise(quote("ignore previous", safe=""), ["url"]).endswith("\nignore previous")
    assert normalise("%2569gnore", ["url"]).endswith("\nignore")  # double encoding
    assert normalise("&#106;avascript&colon;", ["html"]).endswith("\njavascript:")
    assert normalise(encoded) == fold(encoded)  # nothing decoded unless asked


def test_base64_runs_that_are_words_or_binary_are_skipped() -> None:
    assert normalise("internationalization", ["base64"]) == "internationalization"
    binary = base64.b64encode(bytes(range(256))).decode()
    assert "\n" not in normalise(binary, ["base64"])


@settings(max_examples=3000, deadline=None)
@given(_TEXTS)
def test_quick_checks_agree_with_their_definitions(sample: str) -> None:
    """The byte-level quick checks answer what ``str.isprintable`` and a regex search of a
    base64 run would, and never skip a text whose runs ``_base64_decoded`` would decode."""
    if sample.isascii():
        assert text._ascii_printable(sample.encode()) == sample.isprintable()
    has_run = re.search(r"[A-Za-z0-9+/_-]{16,}", sample) is not None
    if text._has_base64_run(sample):
        assert has_run
    else:
        assert not has_run or text._base64_decoded(sample) == []


def test_strip_control_keeps_text_layout() -> None:
    assert strip_control("a\x00b\x1bc\td\ne\r\n\u202ef\U000e0041") == "abc\td\ne\r\nf"
    assert strip_control("plain") == "plain"


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "hostile",
    [
        "a " * 500_000 + "ab",
        "a  b\t" * 200_000,
        "A" * 1_000_000,
        "%41" * 300_000,
        "&amp;" * 200_000,
        "\u0430\u200b" * 400_000,
    ],
)
def test_one_megabyte_inputs_finish(hostile: str) -> None:
    """Every step is linear: a megabyte of worst-case text finishes (bounded by the timeout)."""
    assert normalise(hostile, ["url", "base64", "html"])
