"""Every Prometheus metric of the gateway, defined once. Label sets are closed."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

CONFIG_RELOADS = Counter(
    "gateway_config_reload_total",
    "Policy reloads by result (success, failure).",
    ["result"],
    registry=REGISTRY,
)
for _result in ("success", "failure"):  # series exist from the start, so increase() sees the first
    CONFIG_RELOADS.labels(_result)

UPSTREAM_ERRORS = Counter(
    "gateway_upstream_errors_total",
    "Upstream failures by kind (refused, connect_timeout, timeout, reset, protocol).",
    ["kind"],
    registry=REGISTRY,
)
REQUEST_ERRORS = Counter(
    "gateway_request_errors_total",
    "Requests the gateway refused itself, by error type (body_too_large, ...).",
    ["type"],
    registry=REGISTRY,
)
POLICY_INFO = Gauge(
    "gateway_policy_loaded_timestamp_seconds",
    "Unix time the policy in use was loaded.",
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "gateway_requests_in_flight",
    "Requests being handled right now.",
    registry=REGISTRY,
)
AUTH_FAILURES = Counter(
    "gateway_auth_failures_total",
    "Tokens refused by reason (missing_token, token_too_large, malformed, alg_not_allowed, "
    "crit, unknown_kid, key_mismatch, bad_signature, expired, not_yet_valid, missing_exp, "
    "wrong_issuer, wrong_audience, missing_sub, unknown_tier, insufficient_scope, unavailable).",
    ["reason"],
    registry=REGISTRY,
)
CACHE_REQUESTS = Counter(
    "gateway_cache_requests_total",
    "Cache lookups by cache (jwt: verified tokens, jwks: key ids) and result (hit, miss).",
    ["cache", "result"],
    registry=REGISTRY,
)
JWKS_FETCHES = Counter(
    "gateway_jwks_fetch_total",
    "JWKS fetches by result (success, failure).",
    ["result"],
    registry=REGISTRY,
)
JWKS_AGE = Gauge(
    "gateway_jwks_age_seconds",
    "Age of the oldest JWKS key set in use (seconds since its last successful fetch).",
    registry=REGISTRY,
)

RATELIMIT_REJECTIONS = Counter(
    "gateway_ratelimit_rejections_total",
    "Requests refused by a limit, by scope (ip, tier, route, tokens, budget).",
    ["scope"],
    registry=REGISTRY,
)
STATE_ERRORS = Counter(
    "gateway_state_errors_total",
    "Failed or timed-out operations of the counter store, by operation (hit, settle, ping).",
    ["op"],
    registry=REGISTRY,
)
STATE_DEGRADED = Gauge(
    "gateway_state_degraded",
    "1 while the counter store's circuit breaker is open and limits follow state.on_error.",
    registry=REGISTRY,
)
STATE_FALLBACK = Counter(
    "gateway_state_fallback_total",
    "Requests decided without the shared counter store, by state.on_error (allow, deny, local).",
    ["mode"],
    registry=REGISTRY,
)

GUARDRAIL_ACTIONS = Counter(
    "gateway_guardrail_actions_total",
    "Guardrail rule hits by stage (input, output), rule id from the policy (or max_chars, "
    "unreadable, pii) and action taken (block, sanitize, truncate, monitor, replace, mask).",
    ["stage", "rule", "action"],
    registry=REGISTRY,
)


def render() -> bytes:
    """The Prometheus text exposition of all gateway metrics."""
    return generate_latest(REGISTRY)
