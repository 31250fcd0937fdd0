"""bench.speed's reading of whether both throughput checks can pass at once."""

from __future__ import annotations

import json

import pytest

from bench.speed import (
    RESULTS,
    _shown,
    _window_lines,
    summarise,
    throughput_window,
    wake_probe,
    workers_bound,
)


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


@pytest.mark.parametrize(
    ("value", "digits", "target", "at_least", "shown"),
    [
        (1.5996, 2, 1.6, True, "1.5996"),  # under an "at least 1.6": not shown as 1.60
        (1.6, 2, 1.6, True, "1.60"),
        (1.4021, 2, 1.6, True, "1.40"),  # far from the target: as the other tables
        (0.501, 2, 0.5, False, "0.501"),  # over an "at most 0.5": not shown as 0.50
        (0.4996, 2, 0.5, False, "0.50"),  # under it: 0.50 agrees with its ✅
        (0.533, 2, 0.5, False, "0.53"),
        (59.7, 0, 60, True, "59.7"),
        (10.1, 1, 6, True, "10.1"),
    ],
)
def test_a_figure_never_contradicts_its_mark(
    value: float, digits: int, target: float, at_least: bool, shown: str
) -> None:
    assert _shown(value, digits, target, at_least) == shown


def test_the_summary_reports_the_machine_on_both_sides_of_the_fixed_rate_runs() -> None:
    res = json.loads(RESULTS.read_text())
    res["machine_wake"] = [
        {"warm_us": 46.0, "after_2ms": 1.63},
        {"warm_us": 47.2, "after_2ms": 1.7},
    ]
    (line,) = [x for x in summarise(res) if x.startswith("This machine")]
    assert "46 and 47 µs" in line and "1.63x and 1.70x" in line


def test_the_wake_probe_measures_the_machine() -> None:
    probe = wake_probe()
    assert probe["warm_us"] > 0 and probe["after_2ms"] > 0


def test_the_pass_through_with_two_workers_is_reported_beside_the_window() -> None:
    run = _run(73, 54)
    bare = run["pass-through"]
    assert isinstance(bare, dict)
    bare.update(rps=13000.0, others_cpu_us_per_req=26)
    run["pass-through, 2 workers"] = {"rps": 15000.0}
    (line,) = [x for x in _window_lines(run) if x]
    assert line.endswith(
        "Two workers give the pass-through itself 1.15x (its 2G / (G + O): 1.47x)."
    )


def test_no_pass_through_workers_sentence_without_its_run() -> None:
    (line,) = [x for x in _window_lines(_run(73, 54)) if x]
    assert "Two workers" not in line
