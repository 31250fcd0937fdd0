"""Every Prometheus metric of the gateway, defined once. Label sets are closed.

With ``gateway run --workers N`` every worker writes its samples to the directory named by
``PROMETHEUS_MULTIPROC_DIR`` (set by the supervisor before the workers start, as
prometheus-client requires) and whichever worker answers ``/metrics`` sums them; each gauge
says how its workers' values combine (``multiprocess_mode``).

:func:`fast_inc` and :func:`fast_observe` are the request path's way to update a bound child:
the library's public ``inc``/``observe`` spend as long on per-call checks (observable, sign,
exemplar) and a linear bucket scan as on the update itself, and a request makes several.

The request path's updates are *buffered*: each sample's amount is added up in the process
and written to the sample by :func:`flush` before the process answers a scrape, when it
stops, and with workers every second (with the gauges). With workers a write goes to the
shared file, taking the library's lock and packing the value into the file (``inc`` 2.0 µs,
``observe`` 4.3 µs, against 0.36 and 1.3 µs in one process); a full-chain request makes nine,
~27 µs, ~6% of its instructions (``python -m bench.instructions --multiprocess``); in one
process buffering saves ~1.4%. A scrape of one process is exact. The price with workers, an
explicit choice: another worker's last second of requests may not be in a scrape yet, and a
worker killed with SIGKILL (or crashing) loses its last second of counts; a worker that
stops normally loses nothing.
"""

from __future__ import annotations

import logging
import math
import os
from bisect import bisect_left
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger("gateway.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
"""Several worker processes share one metrics directory."""
_OBSERVED: list[tuple[Gauge, Callable[[], float]]] = []

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
SPANS_DROPPED = Counter(
    "gateway_spans_dropped_total",
    "Finished sampled spans not handed to the exporter, by reason: queue_full (the export "
    "process fell behind and the oldest queued spans gave way), export_process_gone, "
    "unpicklable (an attribute value the pipe cannot carry).",
    ["reason"],
    registry=REGISTRY,
)
POLICY_INFO = Gauge(
    "gateway_policy_loaded_timestamp_seconds",
    "Unix time the policy in use was loaded.",
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
IN_FLIGHT = Gauge(
    "gateway_requests_in_flight",
    "Requests being handled right now.",
    registry=REGISTRY,
    multiprocess_mode="livesum",
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
    "Cache lookups by cache (jwt: verified tokens, jwks: key ids, over_limit: requests refused "
    "without a store call, hits only; prompt_verdict: input guardrail verdicts on prompt "
    "texts a client sent before) and result (hit, miss).",
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
    multiprocess_mode="livemax",
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
    multiprocess_mode="livemax",
)
STATE_LOCAL = Counter(
    "gateway_state_local_admissions_total",
    "Limited requests admitted in-process on room learnt from the shared store, without a "
    "round trip (state.local_share).",
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


def observe(gauge: Gauge, read: Callable[[], float]) -> None:
    """Report ``read()`` as the gauge's value: read at scrape time in one process; with
    workers, sampled by :func:`sample_observed` (a scrape reads the shared files only)."""
    if MULTIPROCESS:
        _OBSERVED.append((gauge, read))
    else:
        gauge.set_function(read)


def sample_observed() -> None:
    """Write the current value of every observed gauge and the buffered updates (workers call
    this every second)."""
    flush()
    for gauge, read in _OBSERVED:
        gauge.set(read())


def render() -> bytes:
    """The Prometheus text exposition of all gateway metrics (of all workers; this worker's
    buffered updates are flushed first)."""
    flush()
    if MULTIPROCESS:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


Update = Callable[[float], None]


class _Buffered:
    """Amounts added to one sample since the last :func:`flush`."""

    __slots__ = ("amount", "write")

    def __init__(self, write: Update) -> None:
        self.write = write
        self.amount = 0.0

    def add(self, amount: float) -> None:
        """Add ``amount``; it reaches the sample at the next flush."""
        self.amount += amount


_BUFFERED: dict[Update, _Buffered] = {}
"""One buffer a sample, by its write method (bound methods of one object are equal): the
pipelines that policy reloads build bind the same children again and share their buffers, so
this stays as small as the label sets, which are closed."""


def _buffered(write: Update, buffer: bool) -> Update:
    if not buffer:
        return write
    held = _BUFFERED.get(write)
    if held is None:
        held = _BUFFERED[write] = _Buffered(write)
    return held.add


def flush() -> None:
    """Write the buffered amounts to their samples. Runs on the event loop's thread, as do
    the updates (the serving process's request path), so no update is lost in between. A
    write that fails (the shared file) is logged and its amount dropped: the others, and
    the next flushes, still go."""
    for held in _BUFFERED.values():
        amount = held.amount
        if amount:
            held.amount = 0.0
            try:
                held.write(amount)
            except Exception:
                log.exception("writing a metric sample failed")


def fast_inc(child: Counter, buffer: bool = True) -> Update:
    """``child.inc`` without its per-call checks, for a bound child and amounts the caller
    knows are not negative (the library refuses those: pass them to ``child.inc`` to keep its
    error). Falls back to ``child.inc`` if the library's internals are not as expected.
    ``buffer`` adds up the amounts until :func:`flush`: only for updates made on the event
    loop's thread (the request path's), which is where scrapes are answered."""
    inc = getattr(getattr(child, "_value", None), "inc", None)
    return _buffered(inc, buffer) if callable(inc) else child.inc


def fast_observe(child: Histogram, buffer: bool = True) -> Update:
    """``child.observe`` with a binary search for the bucket instead of a scan, and without the
    per-call checks, for a bound child; the same updates (the sum, then the one bucket the
    library would pick), in the same order unbuffered. Falls back to ``child.observe`` if
    the library's internals are not as expected, and for NaN (which no bucket holds).
    ``buffer`` as for :func:`fast_inc`."""
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(getattr(child, "_sum", None), "inc", None)
    slow = child.observe
    if not (
        isinstance(bounds, list)
        and isinstance(buckets, list)
        and len(bounds) == len(buckets) > 0
        and bounds == sorted(bounds)
        and bounds[-1] == math.inf
        and callable(total)
    ):
        return slow
    incs: list[Update] = [_buffered(b.inc, buffer) for b in buckets]
    add: Update = _buffered(total, buffer)

    def observe(amount: float) -> None:
        if amount != amount:  # NaN
            slow(amount)
            return
        add(amount)
        # bisect_left finds the first bound >= amount: the bucket the library's scan stops at.
        incs[bisect_left(bounds, amount)](1)

    return observe
