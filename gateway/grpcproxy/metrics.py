"""The gRPC metrics (names as in go-grpc-prometheus), with bounded method labels.

Method names come from clients, so a client could invent any number of them; the first
``MAX_METHODS`` well-formed names get their own label values, later ones and malformed names
share ``other``, which keeps the label sets closed.
"""

from __future__ import annotations

import re

import grpc
from prometheus_client import Counter, Histogram

from gateway.telemetry.metrics import REGISTRY

HANDLED = Counter(
    "grpc_server_handled_total",
    "gRPC calls completed by the gateway, by service, method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
    registry=REGISTRY,
)
HANDLING = Histogram(
    "grpc_server_handling_seconds",
    "Time from a gRPC call's arrival to its status, by service and method.",
    ["grpc_service", "grpc_method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)

MAX_METHODS = 256
_METHOD = re.compile(r"^/([A-Za-z0-9_.]{1,200})/([A-Za-z0-9_]{1,100})$")
_OTHER = ("other", "other")
CODE_NAMES = {code: code.name for code in grpc.StatusCode}


class MethodMetrics:
    """Label children per (method, code), bound once and reused on the hot path."""

    def __init__(self) -> None:
        self._labels: dict[str, tuple[str, str]] = {}
        self._handled: dict[tuple[str, grpc.StatusCode], Counter] = {}
        self._handling: dict[str, Histogram] = {}

    def labels(self, method: str) -> tuple[str, str]:
        """``(grpc_service, grpc_method)`` for a ``/package.Service/Method`` path."""
        found = self._labels.get(method)
        if found is not None:
            return found
        m = _METHOD.match(method)
        if m is None or len(self._labels) >= MAX_METHODS:
            return _OTHER
        pair = (m.group(1), m.group(2))
        self._labels[method] = pair
        return pair

    def record(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """Count one finished call and observe its duration."""
        service, name = self.labels(method)
        key = (method if (service, name) != _OTHER else "", code)
        counter = self._handled.get(key)
        if counter is None:
            counter = self._handled[key] = HANDLED.labels(service, name, CODE_NAMES[code])
        counter.inc()
        hkey = key[0]
        hist = self._handling.get(hkey)
        if hist is None:
            hist = self._handling[hkey] = HANDLING.labels(service, name)
        hist.observe(seconds)
