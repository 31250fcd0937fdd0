"""Policy sections owned by the individual capabilities (auth, limits, guardrails, ...).

Every field carries a docstring: they are the policy reference in the docs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.policy.types import Cidr, Duration, HostPort, Rate, SecretRef, Size

Algorithm = Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "ES256", "ES384"]
"""JWS algorithms the gateway can verify (``none`` is never one of them)."""

_CFG = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class Section(BaseModel):
    """Base of every policy section: unknown keys are errors, values are immutable."""

    model_config = _CFG


class UpstreamConfig(Section):
    """The service the sidecar protects."""

    url: str = Field(pattern=r"^https?://[^/\s]+(/.*)?$")
    """Base URL of the service, ``http://127.0.0.1:8000``; the request path is appended."""
    connect_timeout: Duration = 2.0
    """Longest wait for a pooled or new connection; exceeded → 503 ``upstream_connect_timeout``."""
    timeout: Duration = 60.0
    """Longest wait for the response headers and, while streaming, between two chunks;
    exceeded → 504 ``upstream_timeout`` (or the stream ends)."""
    pool_size: int = Field(default=256, ge=1, le=10000)
    """Most connections kept open to the upstream at once."""
    keepalive: Duration = 30.0
    """How long an idle pooled connection is kept."""
    preserve_host: bool = True
    """Send the client's ``Host`` header upstream (as Envoy does) rather than the URL's host."""


class StateConfig(Section):
    """Where rate-limit and budget counters live."""

    url: str = Field(
        default="memory://",
        pattern=r"^(memory|redis|rediss|redis\+sentinel|redis\+cluster)://",
    )
    """``memory://`` (one process, the default), ``redis://``, ``rediss://``,
    ``redis+sentinel://`` or ``redis+cluster://``."""
    on_error: Literal["allow", "deny", "local"] = "allow"
    """When the store fails: pass unlimited (``allow``, metered), answer 503 (``deny``) or
    limit in-process at ``limit / replicas`` (``local``)."""
    timeout: Duration = 0.05
    """Per-operation timeout of the store."""
    replicas: int = Field(default=1, ge=1)
    """How many sidecars share the store; used by ``on_error: local``."""
    password: SecretRef | None = None
    """Password of the store (and of its sentinels): ``{env: NAME}`` or ``{file: PATH}``;
    never written in ``url``."""
    key_prefix: str = Field(default="gw", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    """Prefix of every key; give each service its own when several share one Redis."""
    breaker_failures: int = Field(default=3, ge=1)
    """Consecutive store failures that open the circuit breaker: requests then skip the store
    (``on_error`` decides at once) until a background ping succeeds."""
    breaker_probe: Duration = 1.0
    """While the breaker is open, the store is pinged this often; the first answer closes it."""

    @model_validator(mode="after")
    def _no_inline_password(self) -> StateConfig:
        netloc = self.url.split("://", 1)[1].split("/", 1)[0]
        if ":" in netloc.rpartition("@")[0]:
            raise ValueError("no password in state.url: use state.password: {env: NAME}")
        return self


class ForwardHeaders(Section):
    """Headers that carry the verified identity to the service."""

    sub: str | None = "X-User-Id"
    """Header carrying the token's ``sub``."""
    tier: str | None = "X-User-Tier"
    """Header carrying the resolved tier."""
    claims: str | None = None
    """Optional header carrying all verified claims as one JSON object."""


class AuthConfig(Section):
    """JWT validation."""

    required: bool = True
    """Reject requests without a valid token; ``false`` makes the route public."""
    algorithms: list[Algorithm] = Field(default=["HS256"], min_length=1)
    """Allowed ``alg`` values; a token with any other is rejected."""
    secret: SecretRef | None = None
    """Shared secret for HS* algorithms: ``{env: NAME}`` or ``{file: PATH}``."""
    public_keys: list[str] = Field(default_factory=list)
    """PEM or JWK files with public keys for RS*/PS*/ES* algorithms."""
    jwks_url: str | None = Field(default=None, pattern=r"^https://")
    """HTTPS URL of a JWKS document."""
    jwks_refresh: Duration = 300.0
    """Periodic refetch of the JWKS."""
    jwks_cooldown: Duration = 30.0
    """Least time between two refetches triggered by an unknown ``kid``."""
    jwks_max_stale: Duration = 3600.0
    """How long the last good key set is used while the identity provider is unreachable."""
    jwks_ca: str | None = None
    """CA bundle for the JWKS URL; the system trust store otherwise."""
    max_token_bytes: Size = 8192
    """Longest accepted ``Authorization`` header; longer ones are rejected before decoding."""
    issuer: str | None = None
    """Required ``iss`` when set."""
    audience: str | list[str] | None = None
    """Required ``aud`` (one of them) when set."""
    leeway: Duration = 30.0
    """Clock skew tolerated on ``exp``, ``nbf`` and ``iat``."""
    tier_claim: str = "tier"
    """Claim holding the caller's tier."""
    default_tier: str | None = "free"
    """Tier for tokens with a missing or unknown tier; ``null`` denies such tokens."""
    tiers: list[str] | None = None
    """Tiers allowed on this route (403 ``insufficient_scope`` otherwise); all when unset."""
    forward_headers: ForwardHeaders = Field(default_factory=ForwardHeaders)
    """Identity headers sent upstream; client-sent copies are always removed."""
    cache_size: int = Field(default=10000, ge=0)
    """Verified-token cache entries (0 disables the cache)."""


class RateLimitConfig(Section):
    """Request, token and cost limits."""

    per_ip: Rate | None = None
    """Limit per client IP, e.g. ``100/minute``."""
    trusted_proxies: list[Cidr] = Field(default_factory=list)
    """Peers whose ``X-Forwarded-For`` is believed; the client is the right-most untrusted hop."""
    per_tier: dict[str, Rate] = Field(default_factory=dict)
    """Limit per user (``sub``) by tier, e.g. ``{free: 20/minute, pro: 600/minute}``."""
    per_route: Rate | None = None
    """Limit for the whole route, all callers together."""
    tokens_per_tier: dict[str, Rate] = Field(default_factory=dict)
    """LLM tokens per user by tier, e.g. ``{free: 20000/day}``."""
    daily_budget_usd: dict[str, float] = Field(default_factory=dict)
    """Cost budget per user and UTC day by tier, e.g. ``{free: 0.50}``."""
    default_max_tokens: int = Field(default=1024, ge=1)
    """Completion tokens reserved for an LLM request that sets no ``max_tokens`` (the real
    usage of the answer is what is charged in the end)."""


class InputGuardConfig(Section):
    """Checks on prompts before they reach the service."""

    format: Literal["openai", "anthropic", "json_paths", "none"] = "openai"
    """Where the prompt text is in the body."""
    json_paths: list[str] = Field(default_factory=list)
    """With ``format: json_paths``: JSONPath-like paths such as ``$.player_input``."""
    query_params: list[str] = Field(default_factory=list)
    """Query parameters checked as well."""
    max_chars: int | None = Field(default=None, ge=1)
    """Longest prompt text."""
    strip_control: bool = True
    """Remove control characters before checking (and forwarding with ``sanitize``)."""
    rules: list[str | dict[str, str]] = Field(default_factory=list)
    """Rule packs by name (``prompt-injection``, ``waf``) or inline ``{id, pattern, action}``."""
    action: Literal["block", "sanitize", "monitor"] = "block"
    """What a match does."""


class OutputGuardConfig(Section):
    """Checks on answers before they reach the client."""

    max_chars: int | None = Field(default=None, ge=1)
    """Longest answer text."""
    rules: list[str | dict[str, str]] = Field(default_factory=list)
    """Rule packs by name (``unsafe-markup``) or inline ``{id, pattern, action}``."""
    fallback: str = "Sorry, I can't help with that."
    """Text substituted for an unsafe answer."""
    action: Literal["replace", "block", "monitor"] = "replace"
    """What a violation does."""
    image_hosts: list[str] = Field(default_factory=list)
    """Hosts markdown images may point at; others count as exfiltration."""
    mask_pii: bool = False
    """Mask e-mail addresses, phone numbers and card numbers in answers."""


class GuardrailsConfig(Section):
    """Prompt and answer guardrails."""

    input: InputGuardConfig | None = None
    """Checks on requests."""
    output: OutputGuardConfig | None = None
    """Checks on responses."""


class ModelPrice(Section):
    """Price of one model in USD."""

    input_per_1k: float = Field(ge=0)
    """USD per 1000 prompt tokens."""
    output_per_1k: float = Field(ge=0)
    """USD per 1000 completion tokens."""


class CostConfig(Section):
    """Price table used for cost metrics and budgets."""

    models: dict[str, ModelPrice] = Field(default_factory=dict)
    """Prices by model name."""
    default: ModelPrice | None = None
    """Price of models not in the table."""


class TelemetryConfig(Section):
    """Tracing, metrics and logs."""

    service_name: str = "gateway"
    """``service.name`` of spans and the ``service`` metric label."""
    otlp_endpoint: str | None = None
    """OTLP endpoint (``http://collector:4318``); the standard ``OTEL_EXPORTER_OTLP_*``
    variables otherwise; no export when neither is set (trace ids are still propagated)."""
    otlp_protocol: Literal["http/protobuf", "grpc"] | None = None
    """OTLP protocol; ``OTEL_EXPORTER_OTLP_PROTOCOL`` or ``http/protobuf`` when unset."""
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    """Parent-based trace sampling ratio."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Level of the JSON logs (one ``info`` line per request)."""
    access_log: bool = True
    """Write one JSON line per request."""


class TlsServer(Section):
    """Inbound TLS for the gRPC listener."""

    cert: str
    """Server certificate (PEM)."""
    key: str
    """Server private key (PEM)."""
    client_ca: str | None = None
    """CA that client certificates must chain to (mutual TLS)."""


class TlsClient(Section):
    """Outbound TLS to the gRPC upstream."""

    ca: str
    """CA the upstream's certificate must chain to."""
    cert: str | None = None
    """Client certificate presented to the upstream."""
    key: str | None = None
    """Client private key."""


class GrpcConfig(Section):
    """The gRPC side of the proxy."""

    listen: HostPort = "0.0.0.0:50051"
    """gRPC listener address."""
    upstream: HostPort
    """gRPC service address."""
    tls: TlsServer | None = None
    """Inbound TLS / mTLS."""
    upstream_tls: TlsClient | None = None
    """Outbound TLS / mTLS."""
    plaintext: bool = False
    """Must be ``true`` explicitly to run without TLS."""
    max_message_bytes: Size = 4 * 1024 * 1024
    """Largest gRPC message accepted either way."""

    @model_validator(mode="after")
    def _tls_or_plaintext(self) -> GrpcConfig:
        if not self.plaintext and (self.tls is None or self.upstream_tls is None):
            raise ValueError("set tls and upstream_tls, or plaintext: true explicitly")
        return self
