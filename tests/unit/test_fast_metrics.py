"""The request path's metric updates: the same samples as prometheus-client's own inc/observe,
and the recorder's series, values and refusals as they were."""

from __future__ import annotations

import math
import uuid
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from gateway.context import Identity, RequestContext
from gateway.policy import load_policy_text
from gateway.routes import CompiledRoute
from gateway.telemetry.metrics import REGISTRY, fast_inc, fast_observe, flush
from gateway.telemetry.recorder import Recorder

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.4, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0)
AMOUNTS = [0, 0.001, 0.0011, 0.0025, 0.3, 0.4, 9.99, 10.0, 10.01, 1e9, -1.0, 1e-12, 3]


def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], str]]:
    """Every sample but the creation timestamps, values as repr (so NaN compares)."""
    return [
        (s.name, s.labels, repr(s.value))
        for metric in registry.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    ]


def twin_histograms() -> tuple[CollectorRegistry, Histogram, CollectorRegistry, Histogram]:
    a, b = CollectorRegistry(), CollectorRegistry()
    ha = Histogram("h", "h", ["route"], buckets=BUCKETS, registry=a)
    hb = Histogram("h", "h", ["route"], buckets=BUCKETS, registry=b)
    return a, ha, b, hb


@pytest.mark.parametrize("amounts", [AMOUNTS, [*AMOUNTS, math.inf, -math.inf, math.nan, 0.2]])
def test_fast_observe_gives_the_library_samples(amounts: list[float]) -> None:
    a, ha, b, hb = twin_histograms()
    slow, fast = ha.labels("chat"), fast_observe(hb.labels("chat"), buffer=False)
    for amount in amounts:
        slow.observe(amount)
        fast(amount)
        assert samples(a) == samples(b), amount


def test_fast_inc_gives_the_library_samples() -> None:
    a, b = CollectorRegistry(), CollectorRegistry()
    ca = Counter("c", "c", ["model"], registry=a).labels("m")
    cb = fast_inc(Counter("c", "c", ["model"], registry=b).labels("m"), buffer=False)
    for amount in (1, 0, 250, 0.00027, 1e-9, math.inf):
        ca.inc(amount)
        cb(amount)
        assert samples(a) == samples(b)


def test_buffered_updates_reach_the_samples_at_flush() -> None:
    """With workers the request path's updates are added up and written at ``flush``: the
    samples then hold what the library's own calls give (sums up to float rounding)."""
    a, ha, b, hb = twin_histograms()
    slow, fast = ha.labels("chat"), fast_observe(hb.labels("chat"), buffer=True)
    ca = Counter("c", "c", registry=a)
    cb = fast_inc(Counter("c", "c", registry=b), buffer=True)
    unwritten = samples(b)
    for _ in range(3):
        for amount in [x for x in AMOUNTS if x >= 0]:
            slow.observe(amount)
            fast(amount)
            ca.inc(amount)
            cb(amount)
        assert samples(b) == unwritten  # nothing written before the flush
        flush()
        written = samples(b)
        expected = samples(a)
        assert [(n, lab) for n, lab, _ in written] == [(n, lab) for n, lab, _ in expected]
        for (name, _, got), (_, _, want) in zip(written, expected, strict=True):
            assert float(got) == pytest.approx(float(want), rel=1e-12), name
        flush()  # nothing left: a second flush writes nothing
        assert samples(b) == written
        unwritten = written


def test_binding_a_child_again_shares_its_buffer() -> None:
    """Each policy reload binds the request path's children again: they share one buffer a
    sample, so the buffers do not grow with reloads and every amount is written once."""
    from gateway.telemetry import metrics

    registry = CollectorRegistry()
    child = Counter("c", "c", ["model"], registry=registry).labels("m")
    before = len(metrics._BUFFERED)
    updates = [fast_inc(child) for _ in range(5)]
    histogram = Histogram("h", "h", buckets=BUCKETS, registry=registry)
    observes = [fast_observe(histogram) for _ in range(5)]
    assert len(metrics._BUFFERED) == before + 1 + 1 + len(BUCKETS) + 1  # inf bucket, sum
    for update, observe in zip(updates, observes, strict=True):
        update(2)
        observe(0.3)
    flush()
    assert registry.get_sample_value("c_total", {"model": "m"}) == 10
    assert registry.get_sample_value("h_count") == 5
    assert registry.get_sample_value("h_sum") == pytest.approx(1.5)


def test_a_failing_write_is_logged_and_the_others_still_go(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A write to the shared file that fails at a flush (the sampler's, a scrape's) must not
    stop the other samples' writes, nor the flushes after it."""

    class Broken:
        class _value:  # prometheus-client's attribute name
            @staticmethod
            def inc(amount: float) -> None:
                raise OSError("no space left on device")

    registry = CollectorRegistry()
    good = fast_inc(Counter("c", "c", registry=registry))
    bad = fast_inc(cast(Any, Broken()))
    for _ in range(2):
        bad(1)
        good(1)
        with caplog.at_level("ERROR", logger="gateway.metrics"):
            flush()
    assert registry.get_sample_value("c_total") == 2
    assert caplog.text.count("writing a metric sample failed") == 2


def test_fast_updates_fall_back_to_the_public_methods() -> None:
    class Plain:
        def inc(self, amount: float = 1) -> None:
            pass

        def observe(self, amount: float) -> None:
            pass

    plain = Plain()
    assert fast_inc(cast(Any, plain)) == plain.inc
    assert fast_observe(cast(Any, plain)) == plain.observe


POLICY = """
version: 1
upstream: {url: "http://127.0.0.1:1"}
cost:
  models: {priced: {input_per_1k: 0.001, output_per_1k: 0.002}}
telemetry: {service_name: SERVICE}
"""


def recorder() -> tuple[Recorder, str]:
    """A recorder under a service name of its own, so samples start from zero."""
    service = f"svc-{uuid.uuid4().hex[:8]}"
    return Recorder(load_policy_text(POLICY.replace("SERVICE", service))), service


def request(
    route: CompiledRoute,
    status: int = 200,
    model: str | None = None,
    tokens: tuple[int, int] = (0, 0),
    cost: float = 0.0,
    tier: str | None = "pro",
    method: str = "POST",
    upstream: float | None = None,
) -> RequestContext:
    ctx = RequestContext({}, "rid", route, method, "/v1/chat/completions", "127.0.0.1", [])
    ctx.status = status
    ctx.identity = Identity("user-1", tier, {}) if tier else None
    ctx.usage.model = model
    ctx.usage.input_tokens, ctx.usage.output_tokens = tokens
    ctx.usage.cost_usd = cost
    ctx.upstream_seconds = upstream
    return ctx


def value(name: str, **labels: str) -> float | None:
    flush()  # as a scrape does
    return REGISTRY.get_sample_value(name, labels)


def test_recorder_series_and_values() -> None:
    rec, service = recorder()
    name = f"route-{service}"
    route = CompiledRoute(name, "/v1", None, "layer-" + service, None, None, None)
    rec.finish(request(route, status=404, tier=None, method="BREW"))
    assert value("http_requests_total", method="OTHER", endpoint=name, status="404") == 1
    assert value("http_request_duration_seconds_count", method="OTHER", endpoint=name) == 1
    # No usage: the LLM series of this route do not exist yet.
    assert value("cost_per_request_usd_count", service=service, request_type=name) is None
    rec.finish(request(route, model="priced", tokens=(250, 12), cost=0.000274, upstream=0.02))
    rec.finish(request(route, model="unpriced", tokens=(10, 0), cost=0.0, tier="free"))
    rec.finish(request(route, model="priced", tokens=(0, 0), upstream=0.3))
    assert value("http_requests_total", method="POST", endpoint=name, status="200") == 3
    assert value("cost_per_request_usd_count", service=service, request_type=name) == 2
    assert value("cost_per_request_usd_sum", service=service, request_type=name) == 0.000274
    bucket = {"service": service, "request_type": name, "le": "0.0001"}
    assert value("cost_per_request_usd_bucket", **bucket) == 1  # the 0.0 of the unpriced one
    assert value("llm_cost_usd_total", model="priced", tier="pro") is not None
    assert value("llm_cost_usd_total", model="other", tier="free") is not None
    latency = {"layer": route.layer or "", "model": "priced"}
    assert value("ai_inference_latency_seconds_count", **latency) == 2
    assert value("ai_inference_latency_seconds_sum", **latency) == 0.02 + 0.3
    assert value("ai_inference_latency_seconds_bucket", **latency, le="0.025") == 1


def test_recorder_counts_estimated_usage_and_refuses_negative_amounts() -> None:
    rec, service = recorder()
    route = CompiledRoute(f"route-{service}", "/v1", None, None, None, None, None)
    estimated = value("llm_usage_estimated_total") or 0.0
    ctx = request(route, model="priced", tokens=(5, 5), cost=0.1)
    ctx.usage.estimated = True
    rec.finish(ctx)
    assert value("llm_usage_estimated_total") == estimated + 1
    before = value("llm_tokens_total", model="priced", type="input")
    with pytest.raises(ValueError, match="non-negative"):  # as prometheus-client always did
        rec.finish(request(route, model="priced", tokens=(-5, 5), cost=0.1))
    assert value("llm_tokens_total", model="priced", type="input") == before
