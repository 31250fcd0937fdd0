"""Per-request metrics under the names operators of the seed design expect.

Label sets are closed: ``endpoint`` is the route name (``other`` when unmatched), ``method``
one of the standard methods or ``OTHER``, ``model`` a model of the policy's price table or
``other``; user ids are never labels. Children are bound once and cached, since a labelled
observe is the costly part (~3 µs).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from gateway.telemetry.metrics import REGISTRY

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

HTTP_REQUESTS = Counter(
    "http_requests_total",
    "Requests answered, by method, endpoint (route name) and status.",
    ["method", "endpoint", "status"],
    registry=REGISTRY,
)
HTTP_DURATION = Histogram(
    "http_request_duration_seconds",
    "Time from the request's arrival to the end of its answer, by method and endpoint.",
    ["method", "endpoint"],
    buckets=(
        0.001,
        0.0025,
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.4,
        0.5,
        1.0,
        1.5,
        2.5,
        5.0,
        10.0,
    ),
    registry=REGISTRY,
)
ADDED_LATENCY = Histogram(
    "gateway_added_latency_seconds",
    "Time the gateway added to a proxied request, by endpoint: its duration less the time from "
    "sending the upstream request to the last byte of the upstream's answer. Only requests the "
    "upstream answered completely; waits on the state store (rate limits, budgets) count as "
    "added. Buckets at the 0.5 ms and 2 ms latency targets of the speed benchmark.",
    ["endpoint"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    registry=REGISTRY,
)
INFERENCE_LATENCY = Histogram(
    "ai_inference_latency_seconds",
    "Time the upstream (inference layer) took to answer, by layer and model.",
    ["layer", "model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.4, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
COST_PER_REQUEST = Histogram(
    "cost_per_request_usd",
    "Cost of one LLM request in USD, by service and request type (route name).",
    ["service", "request_type"],
    buckets=(0.00001, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0),
    registry=REGISTRY,
)
LLM_TOKENS = Counter(
    "llm_tokens_total",
    "LLM tokens by model and type (input, output).",
    ["model", "type"],
    registry=REGISTRY,
)
LLM_COST = Counter(
    "llm_cost_usd_total",
    "LLM cost in USD by model and tier.",
    ["model", "tier"],
    registry=REGISTRY,
)
ESTIMATED_USAGE = Counter(
    "llm_usage_estimated_total",
    "Requests whose token counts were estimated because the answer carried no usage.",
    registry=REGISTRY,
)


ACTIVE_CONNECTIONS = Gauge(
    "active_connections",
    "Open client connections.",
    ["service"],
    registry=REGISTRY,
    multiprocess_mode="livesum",
)


def method_label(method: str) -> str:
    """The method, or ``OTHER`` for anything outside the standard set (bounded label)."""
    return method if method in METHODS else "OTHER"
