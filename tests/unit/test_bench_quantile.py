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
