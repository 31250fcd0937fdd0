"""bench.speed's reading of whether both throughput checks can pass at once."""

from __future__ import annotations

import pytest

from bench.speed import _window_lines, throughput_window, workers_bound


def test_the_window_edges_are_where_each_check_is_just_met() -> None:
    low, high = throughput_window(72.0, 30.0)
    assert (low, high) == (120.0, 120.0)
    assert workers_bound(low, 30.0) == pytest.approx(1.6)  # the workers bound at its target
    assert 72.0 / high == pytest.approx(0.6)  # the first check at its target


def _run(pass_us: int, others_us: int) -> dict[str, object]:
    parts = {"export": 0, "redis": 0, "upstream": 15, "wrk": 11}
    return {
        "pass-through": {"cpu_us_per_req": pass_us, "others_cpu_parts_us_per_req": parts},
        "full chain": {"cpu_us_per_req": 180, "others_cpu_us_per_req": others_us},
    }


def test_an_empty_window_is_said_and_what_redis_and_export_may_cost() -> None:
    (line,) = [x for x in _window_lines(_run(73, 54)) if x]
    assert "no gateway passes both" in line
    assert "G ≤ P / 0.6 = 122 µs" in line and "G ≥ 4·O = 216 µs" in line
    assert "alone cost 26 µs" in line and "P / 2.4 - 26 = 4.4 µs" in line


def test_an_open_window_gives_its_interval() -> None:
    (line,) = [x for x in _window_lines(_run(96, 30)) if x]
    assert "G in [120, 160] µs could" in line


def test_no_window_without_the_cpu_figures() -> None:
    assert _window_lines({"pass-through": {}, "full chain": {}}) == []
