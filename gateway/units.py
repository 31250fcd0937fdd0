"""Parsing of the human units used in policy files: durations, sizes and rates."""

from __future__ import annotations

import re

from limits import parse_many

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_FACTOR = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_FACTOR = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}


def parse_duration(value: object) -> float:
    """Return seconds for a duration such as ``250ms``, ``2s``, ``1m``, ``1h`` or ``1d``.

    A bare number is refused on purpose: ``timeout: 5`` is ambiguous (seconds? ms?).
    """
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_FACTOR[m.group(2)]
    raise ValueError(f"{value!r} is not a duration (use e.g. 250ms, 2s, 1m, 1h)")


def parse_size(value: object) -> int:
    """Return bytes for a size such as ``512KiB``, ``1MiB`` or a plain byte count."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(float(m.group(1)) * _SIZE_FACTOR[m.group(2)])
    raise ValueError(f"{value!r} is not a size (use e.g. 512KiB, 1MiB or a byte count)")


def parse_rate(value: object) -> str:
    """Validate a rate in the ``limits`` notation (``20/minute``, ``10/second;500/hour``)."""
    if isinstance(value, str) and value.strip():
        try:
            if parse_many(value):
                return value.strip()
        except ValueError:
            pass
    raise ValueError(f"{value!r} is not a rate (use e.g. 20/minute or 10/second;500/hour)")
