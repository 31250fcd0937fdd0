"""``bench.speed.bucket_quantile`` reads histogram buckets as Prometheus'
``histogram_quantile`` does (the "gateway's own" figures of the speed table)."""

from __future__ import annotations

import math

import pytest

from bench.speed import _delta, bucket_quantile

BUCKETS = {0.001: 50.0, 0.002: 100.0, 0.005: 100.0, math.inf: 100.0}


@pytest.mark.parametrize(("q", "ms"), [(0.5, 1.0), (0.75, 1.5), (0.25, 0.5), (1.0, 2.0)])
def test_interpolates_inside_the_bucket(q: float, ms: float) -> None:
    assert bucket_quantile(BUCKETS, q) == pytest.approx(ms)


def test_the_open_bucket_gives_the_last_finite_bound() -> None:
    assert bucket_quantile({0.001: 10.0, math.inf: 100.0}, 0.99) == pytest.approx(1.0)


def test_no_observations() -> None:
    assert bucket_quantile({}, 0.5) is None
    assert bucket_quantile({0.001: 0.0, math.inf: 0.0}, 0.5) is None


def test_delta_of_two_scrapes() -> None:
    before = {0.001: 10.0, math.inf: 20.0}
    after = {0.001: 60.0, math.inf: 120.0}
    assert _delta(after, before) == {0.001: 50.0, math.inf: 100.0}
    assert bucket_quantile(_delta(after, before), 0.5) == pytest.approx(1.0)


def test_fixed_rate_rounds_take_the_median_of_each_figure() -> None:
    from bench.speed import median_fields

    runs = [
        {"p50_ms": 0.9, "p99_ms": 1.0, "cpu_us_per_req": 500, "generator": "c", "ok": True},
        {"p50_ms": 0.5, "p99_ms": 9.0, "cpu_us_per_req": 400, "generator": "c", "ok": True},
        {"p50_ms": 0.6, "p99_ms": 2.0, "cpu_us_per_req": 450, "generator": "c", "ok": True},
    ]
    got = median_fields(runs)
    assert got == {
        "p50_ms": 0.6,
        "p99_ms": 2.0,
        "cpu_us_per_req": 450,
        "generator": "c",
        "ok": True,
        "rounds": 3,
    }
    assert median_fields(runs[:1])["p99_ms"] == 1.0
    # an even count takes the higher middle value, as the throughput rounds do
    assert median_fields(runs[:2])["p50_ms"] == 0.9
