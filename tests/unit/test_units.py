"""Durations, sizes and rates."""

from __future__ import annotations

import pytest

from gateway.units import parse_duration, parse_rate, parse_size


def test_durations() -> None:
    assert parse_duration("250ms") == 0.25
    assert parse_duration("2s") == 2.0
    assert parse_duration("1m") == 60.0
    assert parse_duration("1h") == 3600.0
    for bad in ["5", 5, "1 week", "", None, "-1s"]:
        with pytest.raises(ValueError, match="is not a duration"):
            parse_duration(bad)


def test_sizes() -> None:
    assert parse_size("512KiB") == 512 * 1024
    assert parse_size("1MiB") == 1024 * 1024
    assert parse_size(100) == 100
    for bad in ["1 MiBs", -1, True, "x"]:
        with pytest.raises(ValueError, match="is not a size"):
            parse_size(bad)


def test_rates() -> None:
    assert parse_rate("10/second;500/hour") == "10/second;500/hour"
    for bad in ["20/minnute", "", 20, "fast"]:
        with pytest.raises(ValueError, match="is not a rate"):
            parse_rate(bad)
