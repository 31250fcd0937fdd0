"""The normalised text view every content rule reads.

Rules never see raw client or model text; they see ``normalise(text)``:

1. Unicode NFKC (fullwidth, mathematical and circled letters become ASCII), then zero-width,
   bidi and variation-selector characters and C0/C1 controls are removed, Unicode tag
   characters (invisible "ASCII smuggling") become the ASCII they encode, and common
   look-alike letters (Cyrillic, Greek, Armenian, small capitals) are folded to the Latin
   letter they imitate;
2. lower case;
3. letter-spaced words (``i g n o r e``, ``i.g.n.o.r.e``) are joined (a wider gap still
   parts two words), then runs of horizontal whitespace become one space and runs of blank
   lines one newline (newlines are kept: rules may anchor on line starts);
4. optionally (``decode``), URL-encoded text, base64 runs and HTML entities are decoded and
   the decoded text, normalised the same way, is appended on lines of its own.

The view is for matching only: the service still receives the original text unless an action
rewrites it (``strip_control`` is the rewrite used by ``sanitize``). Every step is linear in the
length of the text (RE2 answers whether a rewrite is needed; the rewrites use ``re`` patterns
that cannot backtrack badly).
"""

from __future__ import annotations

import base64
import binascii
import html
import re
import unicodedata
from collections.abc import Collection
from typing import Literal
from urllib.parse import unquote, unquote_plus

import re2  # type: ignore[import-untyped]

Decoding = Literal["url", "base64", "html"]
"""Encodings ``normalise`` can look through."""

_CONTROLS = [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0)]
_BIDI = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_TAGS = list(range(0xE0000, 0xE0080))
_INVISIBLE = [
    0x00AD, 0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, *range(0x180B, 0x1810), 0x200B, 0x200C,
    0x200D, *range(0x2060, 0x2065), 0x3164, *range(0xFE00, 0xFE10), 0xFEFF, 0xFFA0,
    *range(0x1BCA0, 0x1BCA4), *range(0x1D173, 0x1D17B), *range(0xE0100, 0xE01F0),
]  # fmt: skip

#: Look-alike letters → the Latin letter they imitate (after NFKC, before lower-casing):
#: Cyrillic, Greek, then Armenian, Latin small capitals and other common stand-ins.
_CONFUSABLES: dict[str, str] = {}
_CYRILLIC = (
    "\u0430\u0432\u0435\u0451\u043a\u043c\u043d\u043e\u0440\u0441\u0442\u0443",
    "\u0445\u0455\u0456\u0457\u0458\u04bb\u0501\u051b\u051d\u04cf\u044c\u043f",
    "\u0433\u0410\u0412\u0415\u041a\u041c\u041d\u041e\u0420\u0421\u0422\u0423",
    "\u0425\u0405\u0406\u0408\u0500\u051a\u051c\u04c0\u04ae\u04af",
)
_CONFUSABLES.update(
    zip("".join(_CYRILLIC), "abeekmhopctyxsiijhdqwlbnrABEKMHOPCTYXSIJDQWIYy", strict=True)
)
_GREEK = (
    "\u03b1\u03b2\u03b3\u03b5\u03b7\u03b9\u03ba\u03bd\u03bf\u03c1\u03c4\u03c5",
    "\u03c7\u03c9\u03f2\u03f3\u03c2\u0391\u0392\u0395\u0396\u0397\u0399\u039a",
    "\u039c\u039d\u039f\u03a1\u03a4\u03a5\u03a7\u03f9",
)
_CONFUSABLES.update(zip("".join(_GREEK), "abyenikvoptuxwcjsABEZHIKMNOPTYXC", strict=True))
_OTHER = (
    "\u0261\u0585\u057d\u0581\u0570\u0578\u0251\u0131\u0237\u1d00\u0299\u1d04",
    "\u1d05\u1d07\u0262\u029c\u026a\u1d0a\u1d0b\u029f\u1d0d\u0274\u1d0f\u1d18",
    "\u0280\ua731\u1d1b\u1d1c\u1d20\u1d21\u028f\u1d22",
)
_CONFUSABLES.update(zip("".join(_OTHER), "goughnaijabcdeghijklmnoprstuvwyz", strict=True))

_SPACES = {0x0B: " ", 0x0C: " ", 0x85: " "}
_FOLD: dict[int, str | None] = {cp: None for cp in (*_CONTROLS, *_BIDI, *_TAGS, *_INVISIBLE)}
_FOLD.update({ord(k): v for k, v in _CONFUSABLES.items()})
_FOLD.update(_SPACES)
_FOLD.update({cp: chr(cp - 0xE0000) for cp in range(0xE0020, 0xE007F)})  # "ASCII smuggling"
_ASCII_CONTROLS: dict[int, str | None] = {cp: None for cp in _CONTROLS if cp < 0x80}
_ASCII_FOLD: dict[int, str | None] = {**_ASCII_CONTROLS, 0x0B: " ", 0x0C: " "}
_STRIP: dict[int, str | None] = {cp: None for cp in (*_CONTROLS, *_BIDI, *_TAGS)}

# RE2 answers "is there anything to do?" in a few µs; the rare rewrite then uses ``re`` with
# patterns that cannot backtrack badly (google-re2's ``sub`` is slow with many matches).
_ODD_SPACE_Q = re2.compile(r"[ \t\r\f\v]{2,}|[\t\r\f\v]")
_ODD_SPACE = re.compile(r"[ \t\r\f\v]{2,}|[\t\r\f\v]")
_BLANK_LINES_Q = re2.compile(r" \n|\n[ \n]")
_BLANK_LINES = re.compile(r" ?\n[\n ]*")
_SPACED_Q = re2.compile(r"\b(?:\w[ ._*-]){2,}\w\b")
_SPACED = re.compile(r"(?:\w[ ._*-]){2,}\w")
_SEPARATORS = str.maketrans("", "", " ._*-")
_FOLD_Q = re2.compile("[" + "".join(f"\\x{{{cp:x}}}" for cp in sorted(_FOLD)) + "]")
# Quick checks on bytes without a regex engine: ``bytes.translate`` and ``.find`` run in C at
# ~1.5 µs a KB, where one google-re2 search costs 5-10 µs a KB through its Python wrapper.
_B64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/_-"
_B64_CLASS = bytes(0x61 if b in _B64_CHARS else 0x20 for b in range(256))  # run chars → "a"
_B64_LONG = b"a" * 16
_DROP_B64_LETTERS_AND_OTHERS = bytes(b for b in range(256) if b not in b"0123456789+/_-=")
_ASCII_CTRL = bytes([*range(0x20), 0x7F])
_B64_RUN = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")
_URL_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_HTML_ENTITY = re.compile(r"&(?:#\d{1,7}|#[xX][0-9A-Fa-f]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});?")


def strip_control(text: str) -> str:
    """``text`` without C0/C1 control characters (tab, CR and LF kept), bidi overrides and
    Unicode tag characters: the rewrite ``sanitize`` forwards."""
    if text.isascii():
        return text if _ascii_printable(text.encode()) else text.translate(_ASCII_CONTROLS)
    return text.translate(_STRIP)


def _ascii_printable(raw: bytes) -> bool:
    """``str.isprintable`` of ASCII text, from its bytes (a third of its cost)."""
    return len(raw.translate(None, _ASCII_CTRL)) == len(raw)


def fold(text: str) -> str:
    """Steps 1 to 3 of the view: NFKC, invisible removal, look-alikes, lower case, spacing."""
    if text.isascii():
        raw = text.encode()
        printable = _ascii_printable(raw)
        if not printable:
            text = text.translate(_ASCII_FOLD)
            raw = text.encode()
    else:
        printable = False
        text = unicodedata.normalize("NFKC", text)
        try:
            raw = text.encode()
        except UnicodeEncodeError:  # lone surrogates (e.g. from an upstream's JSON escapes)
            text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
            raw = text.encode()
        if _FOLD_Q.search(raw) is not None:
            text = text.translate(_FOLD)
            raw = text.encode()
    text = text.lower()
    if _SPACED_Q.search(raw) is not None:  # before spacing is collapsed: wide gaps part words
        text = _SPACED.sub(_join_letters, text)
    # .find: `in` on bytes first tries the buffer protocol, raising and clearing a TypeError
    if (not printable or raw.find(b"  ") >= 0) and _ODD_SPACE_Q.search(raw) is not None:
        text = _ODD_SPACE.sub(" ", text)
    if not printable and _BLANK_LINES_Q.search(raw) is not None:
        text = _BLANK_LINES.sub("\n", text)
    return text


def _join_letters(m: re.Match[str]) -> str:
    """Join ``i g n o r e`` to ``ignore``; letters that belong to a neighbouring word stay."""
    run, text = m.group(0), m.string
    head = tail = ""
    if m.start() > 0 and _is_word(text[m.start() - 1]):
        head, run = run[:2], run[2:]
    if m.end() < len(text) and _is_word(text[m.end()]):
        run, tail = run[:-2], run[-2:]
    if len(run) < 5:
        return head + run + tail
    return head + run.translate(_SEPARATORS) + tail


def _is_word(char: str) -> bool:
    return char.isalnum() or char == "_"


def normalise(text: str, decode: Collection[Decoding] = ()) -> str:
    """The view rules match: ``fold(text)``, plus the folded decodings asked for in ``decode``,
    each on its own line."""
    view = fold(text)
    extra: list[str] = []
    if "url" in decode and "%" in text:
        extra.extend(_url_decoded(text))
    if "html" in decode and "&" in text:
        unescaped = _unescape(text)
        if unescaped != text:
            extra.append(unescaped)
    if "base64" in decode and len(text) >= 16 and _has_base64_run(text):
        extra.extend(_base64_decoded(text))
    if not extra:
        return view
    return "\n".join([view, *(fold(e) for e in extra)])


def _has_base64_run(text: str) -> bool:
    """Whether ``_base64_decoded`` could find anything: a run of 16 base64 characters, in a
    text that has a digit, symbol or padding somewhere (runs of letters only are skipped)."""
    raw = text.encode("utf-8", "surrogatepass")
    return raw.translate(_B64_CLASS).find(_B64_LONG) >= 0 and bool(
        raw.translate(None, _DROP_B64_LETTERS_AND_OTHERS)
    )


def _url_decoded(text: str) -> list[str]:
    out: list[str] = []
    current = text
    for _ in range(2):  # double encoding (%2569) once more, no further
        if _URL_ESCAPE.search(current) is None:
            break
        # Query strings and forms encode spaces as "+"; text that has real spaces does not.
        current = (unquote if " " in current else unquote_plus)(current, errors="replace")
        out.append(current)
    return out


def _unescape(text: str) -> str:
    if _HTML_ENTITY.search(text) is None:
        return text
    once = html.unescape(text)
    return html.unescape(once) if "&" in once and once != text else once


def _base64_decoded(text: str, limit: int = 64) -> list[str]:
    """Printable UTF-8 decodings of base64 runs (standard or URL-safe alphabet)."""
    out: list[str] = []
    for match in _B64_RUN.finditer(text):
        run = match.group(0)
        if run.isalpha() or run.isdigit():
            continue  # a long word or number, not base64
        core = run.rstrip("=")
        try:
            raw = base64.b64decode(
                core + "=" * (-len(core) % 4),
                altchars=b"-_" if "-" in core or "_" in core else None,
            )
            decoded = raw.decode("utf-8")
        except (binascii.Error, ValueError):
            continue
        if decoded and sum(c.isprintable() or c in "\n\t" for c in decoded) >= 0.9 * len(decoded):
            out.append(decoded)
            if len(out) >= limit:
                break
    return out
