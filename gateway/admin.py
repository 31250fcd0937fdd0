"""The admin listener (its own port): /healthz, /readyz, /metrics and nothing else."""

from __future__ import annotations

import json
from collections.abc import Callable

from gateway.asgi import Receive, Scope, Send, send_simple
from gateway.pipeline import Pipeline, ReadinessCheck
from gateway.telemetry import metrics

_JSON = (b"content-type", b"application/json")


def _json(status: int, payload: object) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = json.dumps(payload).encode()
    return status, [_JSON, (b"content-length", str(len(body)).encode())], body


class AdminApp:
    """Liveness, readiness and metrics for the orchestrator and Prometheus."""

    def __init__(self, current: Callable[[], Pipeline]) -> None:
        self._current = current
        self.draining = False
        """Set on SIGTERM so readiness fails while in-flight requests finish."""
        self.checks: dict[str, ReadinessCheck] = {}
        """Readiness checks of listeners outside the pipeline (the gRPC upstream)."""

    async def failing(self) -> list[str]:
        """Why the gateway is not ready (``/readyz``, the gRPC health service); empty when it is."""
        if self.draining:
            return ["draining"]
        failing = await self._current().readiness()
        for name, check in self.checks.items():
            reason = await check()
            if reason is not None:
                failing.append(f"{name}: {reason}")
        return failing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if scope["method"] not in ("GET", "HEAD"):
            status, headers, body = _json(405, {"error": {"type": "method_not_allowed"}})
        elif path == "/healthz":
            status, headers, body = _json(200, {"status": "ok"})
        elif path == "/readyz":
            failing = await self.failing()
            if failing:
                status, headers, body = _json(503, {"status": "not ready", "failing": failing})
            else:
                status, headers, body = _json(200, {"status": "ready"})
        elif path == "/metrics":
            body = metrics.render()
            status = 200
            headers = [
                (b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ]
        else:
            status, headers, body = _json(404, {"error": {"type": "not_found"}})
        await send_simple(send, status, headers, b"" if scope["method"] == "HEAD" else body)
