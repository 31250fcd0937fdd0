"""The policy file as typed configuration: the top level and routes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.policy.sections import (
    AuthConfig,
    CostConfig,
    GrpcConfig,
    GuardrailsConfig,
    RateLimitConfig,
    StateConfig,
    TelemetryConfig,
    UpstreamConfig,
)
from gateway.policy.types import Duration, HostPort, Size

_CFG = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

#: Sections a route may override; the route's value is merged over the top-level one.
ROUTE_SECTIONS = ("auth", "rate_limits", "guardrails")


class Route(BaseModel):
    """A group of paths with its own name (the metrics label) and optional overrides."""

    model_config = _CFG

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """Route name, used as the ``endpoint`` label of metrics."""
    path: str = Field(pattern=r"^/[^\s?#]*$")
    """Path prefix: ``/v1/chat`` matches ``/v1/chat`` and ``/v1/chat/x``, not ``/v1/chatx``."""
    methods: list[str] | None = None
    """HTTP methods this route matches; all when unset."""
    layer: str | None = None
    """Inference layer label (``layer3``, ``layer4``) used by the latency metrics."""
    auth: AuthConfig | None = None
    """Overrides of the top-level ``auth`` section (merged key by key)."""
    rate_limits: RateLimitConfig | None = None
    """Overrides of the top-level ``rate_limits`` section (merged key by key)."""
    guardrails: GuardrailsConfig | None = None
    """Overrides of the top-level ``guardrails`` section (merged key by key)."""

    @field_validator("methods")
    @classmethod
    def _upper(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        for m in v:
            if not m.isalpha():
                raise ValueError(f"{m!r} is not an HTTP method")
        return [m.upper() for m in v]


class Policy(BaseModel):
    """The whole policy file."""

    model_config = _CFG

    version: Literal[1]
    """Policy format version; always ``1``."""
    listen: HostPort = "0.0.0.0:8080"
    """Where clients connect (restart to change)."""
    admin_listen: HostPort = "127.0.0.1:9901"
    """Admin listener: ``/healthz``, ``/readyz`` and ``/metrics`` only (restart to change)."""
    upstream: UpstreamConfig
    """The protected service."""
    max_body_bytes: Size = 1024 * 1024
    """Largest request body; larger → 413 without buffering it."""
    max_header_bytes: Size = 16 * 1024
    """Largest total size of the request headers; larger → 431."""
    max_header_count: int = Field(default=100, ge=1, le=10000)
    """Most request header fields; more → 431 (as Envoy's and Apache's default)."""
    max_connections: int = Field(default=4096, ge=1)
    """Most client connections open at once; one more gets a 503 ``overloaded`` answer and is
    closed (keep it below the process's open-file limit)."""
    max_in_flight: int = Field(default=1024, ge=1)
    """Most requests handled at once; beyond → 503 ``overloaded`` with ``Retry-After: 1``
    (shedding load early beats queueing it until every request times out)."""
    header_read_timeout: Duration = Field(default=10.0, gt=0)
    """Longest time from a connection's opening (or a request's first byte) to the end of
    its request headers; exceeded → 408 ``request_timeout`` (or a silent close when nothing
    was sent) — the slowloris guard."""
    body_read_timeout: Duration = Field(default=30.0, gt=0)
    """Longest wait for the next piece of a request body the gateway is reading; exceeded →
    408 ``request_timeout`` and the connection is closed."""
    drain_timeout: Duration = 25.0
    """On SIGTERM, how long in-flight requests may take to finish before the process exits
    (keep it below the pod's ``terminationGracePeriodSeconds``)."""
    state: StateConfig = Field(default_factory=StateConfig)
    """Counter store for limits and budgets."""
    auth: AuthConfig | None = None
    """JWT validation; absent → no authentication."""
    rate_limits: RateLimitConfig | None = None
    """Limits; absent → no limits."""
    guardrails: GuardrailsConfig | None = None
    """Prompt and answer guardrails; absent → none."""
    cost: CostConfig | None = None
    """Model prices."""
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    """Tracing, metrics and logs."""
    grpc: GrpcConfig | None = None
    """gRPC proxy; absent → off."""
    routes: list[Route] = Field(default_factory=list)
    """Routes, first match wins; without routes the sections apply to every path."""

    @model_validator(mode="after")
    def _unique_route_names(self) -> Policy:
        seen: set[str] = set()
        for route in self.routes:
            if route.name in seen or route.name == "other":
                raise ValueError(f"route name {route.name!r} is used twice or reserved")
            seen.add(route.name)
        return self
