"""Answer text as a browser would render it: code left out, image hosts, PII masking.

* :func:`strip_code` blanks the inside of markdown fenced blocks (```` ``` ```` / ``~~~``) and
  code spans: a renderer shows them as text, so markup there is not a risk (and answers about
  HTML stay possible). The result has the same length and line breaks as the input.
* :func:`image_hosts` lists the hosts of markdown and HTML images in a normalised view.
* :func:`mask_pii` replaces e-mail addresses, phone numbers and card numbers (Luhn-checked)
  with ``[email]``, ``[phone]`` and ``[card]``.

Every pattern here is linear: RE2 for scanning, ``re`` only on candidates RE2 found.
"""

from __future__ import annotations

import re

import re2  # type: ignore[import-untyped]

from gateway.guard.engine import OPTIONS

_FENCE = re.compile(r"^ {0,3}(?:```|~~~)")
_SPAN = re.compile(r"(?<![=\w])`[^`\n]*`")
_IMAGE = re2.compile(
    rb"(?:!\[[^\]\n]{0,200}\]\(\s{0,10}<?\s{0,10}|<img\b[^>]{0,200}?\bsrc\s{0,5}=\s{0,5}[\"']?\s{0,5})"
    rb"(?:https?:)?//([^/\s)>?#\\\"']{1,253})",
    options=OPTIONS,
)
_REFERENCE = re2.compile(
    rb"(?m)^\s{0,3}\[[^\]\n]{1,200}\]:\s{0,10}<?(?:https?:)?//([^/\s>?#]{1,253})"
)
_PII = re2.compile(
    rb"([A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8}\.[A-Za-z]{2,24})"
    rb"|(\+?\(?\d[\d ().-]{7,22}\d)"
)
_PHONE = re.compile(r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}")
_CARD = re.compile(r"\d(?:[ -]?\d){12,18}")
_NUM_EDGE = frozenset(b"0123456789.-+_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def strip_code(text: str, in_fence: bool = False) -> tuple[str, bool]:
    """``text`` with code blanked out, and whether a fence is still open at its end."""
    if "`" not in text and "~~~" not in text and not in_fence:
        return text, False
    out: list[str] = []
    for line in text.splitlines(keepends=True):
        if _FENCE.match(line):
            in_fence = not in_fence
            out.append(line)
        elif in_fence:
            out.append(_blank(line))
        elif "`" in line:
            out.append(_SPAN.sub(lambda m: "`" + " " * (len(m.group(0)) - 2) + "`", line))
        else:
            out.append(line)
    return "".join(out), in_fence


def _blank(line: str) -> str:
    body = line.rstrip("\r\n")
    return " " * len(body) + line[len(body) :]


def image_hosts(view: str) -> list[str]:
    """Hosts (lower case, without port or credentials) of the images in a normalised view."""
    if "//" not in view:
        return []
    raw = view.encode()
    hosts = [m.group(1) for m in _IMAGE.finditer(raw)]
    if b"![" in raw and b"]:" in raw:
        hosts.extend(m.group(1) for m in _REFERENCE.finditer(raw))
    out: list[str] = []
    for host in hosts:
        name = host.decode("utf-8", "replace").rsplit("@", 1)[-1]
        out.append(name.split(":", 1)[0].rstrip(".").lower())
    return out


def host_allowed(host: str, allowed: frozenset[str]) -> bool:
    """True when ``host`` is on ``allowed`` or a subdomain of an entry."""
    if host in allowed:
        return True
    parts = host.split(".")
    return any(".".join(parts[i:]) in allowed for i in range(1, len(parts)))


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _number(raw: bytes, start: int, end: int) -> str | None:
    """``[card]`` or ``[phone]`` for a digit run that is one, else None."""
    if start > 0 and raw[start - 1] in _NUM_EDGE:
        return None
    after = raw[end : end + 2]
    if after[:1].isalnum() or (after[:1] in (b".", b"-") and after[1:].isdigit()):
        return None
    text = raw[start:end].decode("ascii")
    digits = "".join(c for c in text if c.isdigit())
    if _CARD.fullmatch(text) and 13 <= len(digits) <= 19 and _luhn(digits):
        return "[card]"
    if _PHONE.fullmatch(text) and 9 <= len(digits) <= 15:
        return "[phone]"
    return None


def mask_pii(text: str) -> tuple[str, int]:
    """``text`` with PII masked, and how many items were masked (RE2 finds the candidates;
    boundaries, the Luhn check and the phone shape are checked on each candidate)."""
    raw = text.encode()
    parts: list[bytes] = []
    pos = count = 0
    for m in _PII.finditer(raw):
        start, end = m.span()
        if m.group(1) is not None:
            tag = None if end < len(raw) and chr(raw[end]).isalnum() else "[email]"
        else:
            tag = _number(raw, start, end)
        if tag is not None:
            parts += [raw[pos:start], tag.encode()]
            pos = end
            count += 1
    if not count:
        return text, 0
    parts.append(raw[pos:])
    return b"".join(parts).decode(), count
